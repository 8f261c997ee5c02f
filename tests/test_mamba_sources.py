"""tools/mamba_sources.py on a local archive: only mamba_ssm/'s regular files land in DIR, a wrong sha256 writes
nothing, bad arguments and failed downloads are one line."""

from __future__ import annotations

import hashlib
import io
import tarfile

import pytest

from tools import mamba_sources as M


def _sdist(tmp_path) -> tuple[str, str]:
    """A .tar.gz shaped like mamba-ssm's sdist, with a link and a path out of the tree among its members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        def add(name: str, text: str = "", link: str | None = None) -> None:
            info = tarfile.TarInfo(name)
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            else:
                data = text.encode()
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

        add("mamba_ssm-9/setup.py", "raise SystemExit('never run')")
        add("mamba_ssm-9/mamba_ssm/__init__.py", "__version__ = '9'\n")
        add("mamba_ssm-9/mamba_ssm/ops/triton/ssd_combined.py", "KERNEL = 1\n")
        add("mamba_ssm-9/mamba_ssm/secrets", link="/etc/passwd")
        add("mamba_ssm-9/mamba_ssm/../../escape.py", "x = 1\n")
    path = tmp_path / "mamba_ssm-9.tar.gz"
    path.write_bytes(buf.getvalue())
    return path.as_uri(), hashlib.sha256(buf.getvalue()).hexdigest()


def test_only_the_packages_regular_files_are_written(tmp_path, capsys):
    url, sha = _sdist(tmp_path)
    out = tmp_path / "src"
    assert M.main([str(out), "--url", url, "--sha256", sha]) == 0
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["mamba_ssm/.sdist-sha256", "mamba_ssm/__init__.py", "mamba_ssm/ops/triton/ssd_combined.py"]
    assert not (tmp_path / "escape.py").exists() and not (out / "escape.py").exists()
    assert "2 files of mamba-ssm's sources" in capsys.readouterr().out
    assert M.main([str(out), "--url", "file:///nowhere", "--sha256", sha]) == 0  # already there: no download
    assert "already there" in capsys.readouterr().out


def test_a_wrong_digest_writes_nothing_and_failures_are_one_line(tmp_path, capsys):
    url, sha = _sdist(tmp_path)
    out = tmp_path / "src"
    assert M.main([str(out), "--url", url, "--sha256", "0" * 64]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"sha256 is {sha}, not the pinned" in err and not out.exists()
    assert M.main([str(out), "--url", (tmp_path / "missing.tar.gz").as_uri()]) == 1
    assert capsys.readouterr().err.startswith("error: could not download")


def test_bad_arguments_exit_2(tmp_path):
    for argv in ([], [str(tmp_path / "a"), "--bogus"]):
        with pytest.raises(SystemExit) as exc:
            M.main(argv)
        assert exc.value.code == 2
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exc:
        M.main([str(tmp_path / "file")])
    assert exc.value.code == 2


def test_the_pinned_sdist_is_the_docker_images_version():
    """The kernels checked without a GPU are the ones the Docker image builds."""
    from pathlib import Path

    assert f"mamba_ssm-{M.VERSION}.tar.gz" in M.URL and len(M.SHA256) == 64
    dockerfile = (Path(__file__).resolve().parents[1] / "docker" / "Dockerfile").read_text()
    assert f"ARG MAMBA_SSM_VERSION={M.VERSION}\n" in dockerfile
