"""Repack a wheel without the folders a job never imports, so that it fits what travels to the GPU machine.

Ray's wheel (2.60.0, cp312: 79 MB) is over the device tool's 64 MiB per call; `distinf run` needs
only `ray.init` of a local Ray, actors, placement groups, tasks and `ray.util`. What is dropped:
the Java jars (ray/jars, 32 MB), RLlib, Serve, Ray LLM and the dashboard's web front end
(ray/dashboard/client/build: the dashboard Python modules stay, since the raylet starts the
dashboard agent whether or not the dashboard itself runs). The RECORD is rewritten to list only
what is kept, with each file's sha256 as the wheel had it, so pip installs the result as usual.

    python -m benchmarks.speed.trim_wheel /tmp/raywhl/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl .whl/
    python -m benchmarks.speed.trim_wheel --installed SITE_PACKAGES/ray DEST/ray   # the same cut of an installed copy

`--installed` copies an installed package folder minus the same paths: a check on a machine whose
Python differs from the wheel's (here 3.11 against the GPU machine's 3.12) that the kept part runs.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import shutil
import zipfile
from pathlib import Path

RAY_DROP = ("ray/jars/", "ray/rllib/", "ray/serve/", "ray/llm/", "ray/dashboard/client/build/")


def dropped(name: str, drop: tuple[str, ...] = RAY_DROP) -> bool:
    return name.startswith(drop)


def trim_wheel(wheel: Path, dest: Path, drop: tuple[str, ...] = RAY_DROP) -> Path:
    """`dest`/<same name>: the wheel without members under `drop`, its RECORD rewritten."""
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / wheel.name
    tmp = out.with_name(out.name + ".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        # The wheel's own RECORD (a vendored package's dist-info deeper down is an ordinary file).
        record = next(n for n in src.namelist() if n.count("/") == 1 and n.endswith(".dist-info/RECORD"))
        rows = []
        for info in src.infolist():
            if info.filename == record or dropped(info.filename, drop):
                continue
            data = src.read(info)
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
            if not info.is_dir():
                digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                rows.append([info.filename, f"sha256={digest}", str(len(data))])
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(rows + [[record, "", ""]])
        dst.writestr(record, text.getvalue())
    tmp.replace(out)
    return out


def trim_installed(package: Path, dest: Path, drop: tuple[str, ...] = RAY_DROP) -> Path:
    """A copy of an installed package folder (e.g. site-packages/ray) without the dropped paths."""
    shutil.rmtree(dest, ignore_errors=True)
    root = package.parent

    def ignore(folder: str, names: list[str]) -> list[str]:
        rel = Path(folder).relative_to(root).as_posix()
        return [n for n in names if dropped(f"{rel}/{n}/", drop) or n == "__pycache__"]

    shutil.copytree(package, dest, ignore=ignore, symlinks=True)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a .whl, or with --installed an installed package folder")
    parser.add_argument("dest", type=Path, help="folder for the trimmed wheel, or with --installed the copy's path")
    parser.add_argument("--installed", action="store_true")
    args = parser.parse_args()
    if args.installed:
        print(trim_installed(args.source, args.dest))
    else:
        out = trim_wheel(args.source, args.dest)
        print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB (was {args.source.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
