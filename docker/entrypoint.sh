#!/bin/bash
# Image entrypoint: `docker run IMAGE pretrain cfg.yaml` runs `hybrid-megatron pretrain cfg.yaml`.
#
# A command that is a program on PATH runs as given (`docker run IMAGE bash`), and so does one
# that already starts with hybrid-megatron: pyxis does not run entrypoints by default, but a site
# may enable it, and then srun's `hybrid-megatron pretrain ...` arrives here whole.
# NGC's own entrypoint (CUDA forward-compatibility set-up, banner) still runs first when present.
set -euo pipefail

base_entrypoint=${HM_BASE_ENTRYPOINT:-/opt/nvidia/nvidia_entrypoint.sh}

if (($# == 0)); then
  set -- hybrid-megatron --help
elif [[ $1 == -* ]] || { [[ $1 != */* ]] && ! type -P -- "$1" >/dev/null; }; then
  # an option or a verb of hybrid-megatron, not a program
  set -- hybrid-megatron "$@"
fi

if [[ -x $base_entrypoint ]]; then
  exec "$base_entrypoint" "$@"
fi
exec "$@"
