"""mamba-ssm's Python sources, for the kernel checks that run without a GPU (Triton's interpreter).

    python tools/mamba_sources.py DIR
    TRITON_INTERPRET=1 PYTHONPATH=DIR pytest tests/test_ssm_state_passing_interpreted.py

Fetches the source distribution of mamba-ssm 2.3.2.post1 (the version the GPU wheels are built from) from PyPI,
checks its sha256 against the one pinned here, and writes only the files under ``mamba_ssm/`` into
``DIR/mamba_ssm/``: regular files, no links, nothing outside DIR. Nothing is built or run; the CUDA extensions
the package would compile are not needed, since the interpreted tests import its Triton kernels alone
(``tests/triton_interpreter.py``). A DIR that already holds these sources is left as it is.
Exit 0 when DIR holds the sources, 1 when the download or the check fails, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

VERSION = "2.3.2.post1"
URL = ("https://files.pythonhosted.org/packages/af/48/aa7bec0efc7453fa0512276c0069c854bf684219050294266534bfef34bb/"
       f"mamba_ssm-{VERSION}.tar.gz")
SHA256 = "104cc47e9101e5401a675fa2b784f2952b9b037f3b1dd83b5ac544394e95d028"
STAMP = ".sdist-sha256"  # written last, in DIR/mamba_ssm: the sources are complete


class FetchError(Exception):
    pass


def download(url: str, timeout: float = 120.0) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except (urllib.error.URLError, OSError) as exc:
        raise FetchError(f"could not download {url}: {exc}") from None


def extract(data: bytes, sha256: str, out: Path) -> int:
    """The ``mamba_ssm/`` files of the sdist ``data`` (checked against ``sha256``) into ``out/mamba_ssm``; returns
    how many were written."""
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise FetchError(f"the download's sha256 is {got}, not the pinned {sha256}: refusing it")
    written = 0
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts  # mamba_ssm-VERSION/mamba_ssm/...
            if len(parts) < 3 or parts[1] != "mamba_ssm" or not member.isfile() or ".." in parts:
                continue
            target = out.joinpath(*parts[1:])
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
            written += 1
    if not written:
        raise FetchError("the archive holds no mamba_ssm/ files")
    (out / "mamba_ssm" / STAMP).write_text(sha256 + "\n")
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path, help="where mamba_ssm/ goes (put DIR on PYTHONPATH)")
    ap.add_argument("--url", default=URL, help="the sdist (default: PyPI's mamba-ssm %(prog)s pins)")
    ap.add_argument("--sha256", default=SHA256, help="its expected sha256 (with --url)")
    args = ap.parse_args(argv)
    if args.dir.exists() and not args.dir.is_dir():
        ap.error(f"{args.dir} exists and is not a directory")
    stamp = args.dir / "mamba_ssm" / STAMP
    if stamp.is_file() and stamp.read_text().strip() == args.sha256:
        print(f"{args.dir}/mamba_ssm: already there")
        return 0
    try:
        count = extract(download(args.url), args.sha256, args.dir)
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.dir}/mamba_ssm: {count} files of mamba-ssm's sources (sha256 {args.sha256[:12]}...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
