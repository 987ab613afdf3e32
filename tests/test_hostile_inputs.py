"""Hostile and broken inputs, each generated here in tmp and run through the CLI.

Every case ends in exit 2 with one line on stderr, or in a report that carries the right finding;
no case may create the marker file its payload aims at, and no input changes.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import tarfile
import zipfile

import pytest
import torch

import factories as F
from factories import exit2, invoke
from lossdoctor import dump_batch


class Payload:
    """Runs ``touch MARKER`` when unpickled by a loader that runs code."""

    def __init__(self, marker, how="reduce"):
        self.marker, self.how = str(marker), how

    def __reduce__(self):
        cmd = f"touch {self.marker}"
        if self.how == "exec":
            return (exec, (f"open({self.marker!r}, 'w').close()",))
        if self.how == "subprocess":
            return (subprocess.check_call, (["touch", self.marker],))
        return (os.system, (cmd,))


class Nested:
    """A storage pickled as bytes (torch.storage._load_from_bytes) that hides a payload."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (torch.storage._load_from_bytes, (pickle.dumps(Payload(self.marker), protocol=2),))


def raw(*parts: bytes) -> bytes:
    return b"".join(parts)


def text(s: str | bytes) -> bytes:
    """A BINUNICODE opcode."""
    b = s.encode() if isinstance(s, str) else s
    return b"X" + len(b).to_bytes(4, "little") + b


def handmade(marker) -> dict[str, bytes]:
    """Pickles written opcode by opcode."""
    cmd = f"touch {marker}".encode()
    popen_args = raw(b"(", text("touch"), text(str(marker)), b"l\x85")  # (["touch", marker],)
    return {
        "NEWOBJ-BUILD": raw(
            b"\x80\x02csubprocess\nPopen\n", popen_args, b"\x81}", text("args"), text(cmd), b"sb."
        ),
        "NEWOBJ_EX": raw(b"\x80\x04csubprocess\nPopen\n", popen_args, b"}\x92."),
        "INST": raw(b"(S'", cmd, b"'\nios\nsystem\n."),
        "OBJ": raw(b"(cos\nsystem\nS'", cmd, b"'\no."),
        "STACK_GLOBAL": raw(
            b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94\x93\x94\x8c",
            bytes([len(cmd)]),
            cmd,
            b"\x94\x85\x94R\x94.",
        ),
        "BUILD": raw(
            b"\x80\x02cbuiltins\nopen\nq\x00)\x81}q\x01X\x04\x00\x00\x00fileq\x02X",
            len(str(marker)).to_bytes(4, "little"),
            str(marker).encode(),
            b"sb.",
        ),
        "EXT1": b"\x80\x02\x82\xf0)R.",
        "PERSID": b"\x80\x02Pstorage\n.",
        "open-file": raw(b"cbuiltins\nopen\n(S'", str(marker).encode(), b"'\nS'w'\ntR."),
        "getattr-chain": raw(
            b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(S'os'\ntRS'system'\ntR(S'",
            cmd,
            b"'\ntR.",
        ),
    }


def zip_archive(path, records: dict[str, bytes], compression=zipfile.ZIP_STORED) -> None:
    with zipfile.ZipFile(path, "w", compression) as z:
        for name, data in records.items():
            z.writestr(name, data)


@pytest.fixture()
def env(tmp_path):
    """A valid checkpoint and batch, and the marker path a payload would create."""
    torch.save({"model": F.state_dict()}, tmp_path / "ckpt.pt")
    b = F.batch_dict()
    dump_batch(
        tmp_path / "batch.pt",
        features=b["features"],
        image_sizes=b["image_sizes"],
        gt_boxes=b["gt_boxes"],
        gt_labels=b["gt_labels"],
        strides=b["strides"],
    )
    return tmp_path, tmp_path / "pwned"


def findings(result) -> list[str]:
    assert result.exit_code in (0, 1), result.output
    return [f["code"] for f in json.loads(result.stdout)["findings"]]


# ---- checkpoints that carry code ------------------------------------------------------------

CKPT_PAYLOADS = {
    **{
        f"plain-pickle-protocol-{p}": (
            lambda m, p=p: pickle.dumps({"model": Payload(m)}, protocol=p)
        )
        for p in range(6)
    },
    "plain-pickle-exec": lambda m: pickle.dumps({"model": Payload(m, "exec")}, protocol=2),
    "plain-pickle-subprocess": lambda m: pickle.dumps(
        {"model": Payload(m, "subprocess")}, protocol=4
    ),
    **{f"opcode-{k}": (lambda m, k=k: handmade(m)[k]) for k in handmade("x")},
}


@pytest.mark.parametrize("case", list(CKPT_PAYLOADS))
def test_checkpoint_payload_is_refused_without_running(env, case):
    d, marker = env
    (d / "evil.pt").write_bytes(CKPT_PAYLOADS[case](marker))
    exit2(invoke("inspect", d / "evil.pt", d / "batch.pt"), "evil.pt")
    assert not marker.exists()


@pytest.mark.parametrize("fmt", ["zip", "legacy", "plain-pickle", "nested-storage"])
def test_checkpoint_with_weights_and_payload_reports_it(env, fmt):
    d, marker = env
    obj = {"model": F.state_dict(), "cfg": {"hook": [Payload(marker)]}}
    path = d / "evil.pt"
    if fmt == "zip":
        torch.save(obj, path)
    elif fmt == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    elif fmt == "plain-pickle":
        path.write_bytes(pickle.dumps(obj, protocol=2))
    else:
        torch.save({"model": F.state_dict(), "meta": Nested(marker)}, path)
    r = invoke("inspect", path, d / "batch.pt", "--json", "-", "--fail-on", "error")
    assert "unsafe-pickle-global" in findings(r) and r.exit_code == 1
    assert not marker.exists()
    check = invoke("check", d / "batch.pt", path)
    assert (
        check.exit_code == 0 and "posix.system" in check.stdout and "CODE, not run" in check.stdout
    )


def test_zip_with_a_hostile_data_pkl(env):
    d, marker = env
    zip_archive(
        d / "evil.pt",
        {"archive/data.pkl": pickle.dumps(Payload(marker), protocol=2), "archive/version": b"3\n"},
    )
    exit2(invoke("inspect", d / "evil.pt", d / "batch.pt"), "posix.system, which was not run")
    assert not marker.exists()


def test_zip_bomb_and_missing_storage_records(env):
    d, _ = env
    torch.save({"model": F.state_dict()}, d / "good.pt")
    with zipfile.ZipFile(d / "good.pt") as z:
        records = {n: z.read(n) for n in z.namelist()}
    big = next(n for n in records if "/data/" in n)
    zip_archive(d / "bomb.pt", {**records, big: b"\0" * (64 << 20)}, zipfile.ZIP_DEFLATED)
    exit2(invoke("inspect", d / "bomb.pt", d / "batch.pt"), "inflates")
    zip_archive(d / "hole.pt", {n: v for n, v in records.items() if n != big})
    exit2(invoke("inspect", d / "hole.pt", d / "batch.pt"), "no storage record")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit writes the archive
def test_torchscript_archive_and_tar_file(env):
    d, _ = env
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(d / "scripted.pt"))
    exit2(invoke("inspect", d / "scripted.pt", d / "batch.pt"), "TorchScript archive")
    with tarfile.open(d / "old.tar", "w") as t:
        info = tarfile.TarInfo("storages")
        info.size = 4
        t.addfile(info, io.BytesIO(b"\x80\x02K\x00."))
    exit2(invoke("inspect", d / "old.tar", d / "batch.pt"), "tar-format")


def test_storage_larger_than_the_file(env):
    d, _ = env
    pid = ("storage", torch.FloatStorage, "0", "cpu", 10**12, None)
    storage = object()

    class Big:
        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, (storage, 0, (10,), (1,), False, {}))

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return pid if obj is storage else None

    buf = io.BytesIO()
    for part in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
        pickle.dump(part, buf, protocol=2)
    P(buf, protocol=2).dump({"w": Big()})
    (d / "big.pt").write_bytes(buf.getvalue())
    exit2(invoke("inspect", d / "big.pt", d / "batch.pt"), "larger than the whole file")


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.6, 0.95])
@pytest.mark.parametrize("fmt", ["zip", "legacy", "pickle"])
def test_truncated_checkpoints(env, fmt, fraction):
    d, _ = env
    buf = io.BytesIO()
    if fmt == "pickle":
        pickle.dump({"model": F.state_dict()}, buf, protocol=2)
    else:
        torch.save({"model": F.state_dict()}, buf, _use_new_zipfile_serialization=fmt == "zip")
    data = buf.getvalue()
    (d / "cut.pt").write_bytes(data[: int(len(data) * fraction)])
    exit2(invoke("inspect", d / "cut.pt", d / "batch.pt"), "cut.pt")


# ---- batches that carry code or are broken --------------------------------------------------


def _batch_with(d, marker, where):
    b = F.batch_dict()
    if where == "meta":
        b["meta"] = {"note": [Payload(marker)], "deep": {"x": (Payload(marker, "exec"),)}}
    elif where == "gt_boxes":
        b["gt_boxes"][0] = Payload(marker)
    elif where == "features":
        b["features"]["p3"] = Payload(marker)
    torch.save(b, d / "evil-batch.pt")
    return d / "evil-batch.pt"


def test_batch_meta_payload_is_reported(env):
    d, marker = env
    r = invoke("inspect", d / "ckpt.pt", _batch_with(d, marker, "meta"), "--json", "-")
    assert "unsafe-pickle-global" in findings(r)
    f = next(f for f in json.loads(r.stdout)["findings"] if f["code"] == "unsafe-pickle-global")
    assert f["evidence"] == {"file": "batch", "globals": ["posix.system", "builtins.exec"]}
    assert not marker.exists()


@pytest.mark.parametrize("where,needle", [("gt_boxes", "gt_boxes[0]"), ("features", "features.p3")])
def test_batch_payload_where_a_tensor_belongs(env, where, needle):
    d, marker = env
    r = invoke("inspect", d / "ckpt.pt", _batch_with(d, marker, where))
    exit2(r, needle)
    assert "posix.system, which was not run" in r.stderr and not marker.exists()


def test_batch_as_plain_pickle_payload(env):
    d, marker = env
    (d / "b.pt").write_bytes(pickle.dumps([Payload(marker)], protocol=0))
    exit2(invoke("check", d / "b.pt"), "not a lossdoctor batch dump")
    assert not marker.exists()


def test_zero_images(env):
    d, _ = env
    b = F.batch_dict(n=1)
    b.update(
        features={k: v[:0] for k, v in b["features"].items()},
        image_sizes=[],
        gt_boxes=[],
        gt_labels=[],
    )
    torch.save(b, d / "empty.pt")
    exit2(invoke("inspect", d / "ckpt.pt", d / "empty.pt"), "at least one image")


def test_swapped_and_foreign_files(env):
    d, _ = env
    exit2(
        invoke("inspect", d / "batch.pt", d / "ckpt.pt"),
        "is a lossdoctor batch dump, not a checkpoint",
    )
    exit2(invoke("check", d / "ckpt.pt"), "looks like a checkpoint")
    from lossdoctor.toy.model import TinyDetector

    torch.save(TinyDetector(), d / "model.pt")
    exit2(invoke("inspect", d / "model.pt", d / "batch.pt"), "torch.save(model.state_dict(), PATH)")
    torch.save({"model": TinyDetector()}, d / "wrapped.pt")
    exit2(invoke("inspect", d / "wrapped.pt", d / "batch.pt"), "whole pickled model")


def test_garbage_and_empty_files(env):
    d, _ = env
    (d / "empty.pt").write_bytes(b"")
    exit2(invoke("inspect", d / "empty.pt", d / "batch.pt"), "not a torch checkpoint")
    (d / "noise.pt").write_bytes(os.urandom(4096))
    exit2(invoke("inspect", d / "noise.pt", d / "batch.pt"), "not a torch checkpoint")
    (d / "noise-batch.pt").write_bytes(b"PK\x03\x04" + os.urandom(200))
    exit2(invoke("inspect", d / "ckpt.pt", d / "noise-batch.pt"), "not a lossdoctor batch dump")


# ---- outputs must never replace inputs ------------------------------------------------------


def _unchanged(paths):
    before = {p: p.read_bytes() for p in paths}
    return lambda: all(p.read_bytes() == v for p, v in before.items())


@pytest.mark.parametrize(
    "option,target",
    [
        ("--json", "ckpt.pt"),
        ("--csv", "batch.pt"),
        ("--plot", "ckpt.pt"),
        ("--csv-dir", "ckpt.pt"),
        ("--json", "link-to-ckpt"),
        ("--csv", "hardlink-to-batch"),
        ("--json", "profile.toml"),
    ],
)
def test_outputs_onto_inputs_are_refused(env, option, target):
    d, _ = env
    (d / "profile.toml").write_text('base = "fixed"\n')
    os.symlink(d / "ckpt.pt", d / "link-to-ckpt")
    os.link(d / "batch.pt", d / "hardlink-to-batch")
    same = _unchanged([d / "ckpt.pt", d / "batch.pt", d / "profile.toml"])
    r = invoke(
        "inspect", d / "ckpt.pt", d / "batch.pt", "--old", d / "profile.toml", option, d / target
    )
    exit2(r, str(d / target))
    assert same()


def test_compare_never_writes_over_a_compared_report(env):
    d, _ = env
    assert invoke("inspect", d / "ckpt.pt", d / "batch.pt", "--json", d / "r.json").exit_code == 0
    same = _unchanged([d / "r.json"])
    exit2(
        invoke(
            "compare",
            "--old",
            f"{d / 'r.json'}:legacy",
            "--new",
            d / "r.json",
            "--json",
            d / "r.json",
        ),
        "r.json",
    )
    exit2(
        invoke("compare", "--old", d / "r.json", "--new", d / "r.json", "--csv", d / "r.json"),
        "r.json",
    )
    assert same()


def test_directory_outputs_and_clashing_outputs(env):
    d, _ = env
    (d / "out").mkdir()
    exit2(invoke("inspect", d / "ckpt.pt", d / "batch.pt", "--json", d / "out"), "is a directory")
    exit2(
        invoke(
            "inspect", d / "ckpt.pt", d / "batch.pt", "--json", d / "x.out", "--csv", d / "x.out"
        ),
        "both write",
    )
    r = invoke("inspect", d / "ckpt.pt", d / "batch.pt", "--json", d / "new" / "deep" / "r.json")
    assert r.exit_code == 0 and (d / "new" / "deep" / "r.json").is_file()  # parents are created


# ---- values out of range ----------------------------------------------------------------------

BAD_TOML = {
    "negative weight": ("profile", "[rpn_box]\nweight = -1.0\n", "weight must be >= 0"),
    "negative floor": ("profile", "[roi_cls]\nfloor = -2.0\n", "floor must be >= 0"),
    "nan eps": ("profile", "[roi_box]\neps = nan\n", "eps must be a number"),
    "misspelled normalizer": (
        "profile",
        '[rpn_cls]\nnormalizer = "level_smapled"\n',
        "normalizer 'level_smapled' is unknown",
    ),
    "zero pos weight": ("profile", "pos_weight = 0.0\n", "pos_weight must be > 0"),
    "negative budget": (
        "config",
        "[rpn_sampler]\nbatch_size = -256\n",
        "batch_size must be a positive integer",
    ),
    "zero budget": (
        "config",
        "[roi_sampler]\nbatch_size = 0\n",
        "batch_size must be a positive integer",
    ),
    "zero fraction": (
        "config",
        "[rpn_sampler]\npos_fraction = 0.0\n",
        "pos_fraction must be > 0 and <= 1",
    ),
    "iou above one": ("config", "[rpn_matcher]\nfg_iou = 1.5\n", "fg_iou must be >= 0 and <= 1"),
    "inverted thresholds": (
        "config",
        "[rpn_matcher]\nbg_iou = 0.8\nfg_iou = 0.7\n",
        "bg_iou <= fg_iou",
    ),
    "negative nms": ("config", "[train_proposals]\nnms_iou = -0.1\n", "nms_iou must be >= 0"),
    "zero levels": (
        "config",
        "[roi_pool]\nnum_levels = 0\n",
        "num_levels must be a positive integer",
    ),
    "zero ratio": ("config", "[anchors]\nratios = [0.0, 1.0]\n", "anchors.ratios must be > 0"),
    "score above one": (
        "config",
        "[test]\nscore_thr = 7.0\n",
        "score threshold must be >= 0 and <= 1",
    ),
}


@pytest.mark.parametrize("case", list(BAD_TOML))
def test_out_of_range_values_in_toml(env, case):
    d, _ = env
    kind, text, needle = BAD_TOML[case]
    path = d / f"{kind}.toml"
    path.write_text(text)
    flag = "--new" if kind == "profile" else "--config"
    exit2(invoke("inspect", d / "ckpt.pt", d / "batch.pt", flag, path), needle)


@pytest.mark.parametrize("thr", ["7", "-0.1", "nan"])
def test_score_threshold_out_of_range(env, thr):
    d, _ = env
    exit2(invoke("inspect", d / "ckpt.pt", d / "batch.pt", "--score-thr", thr), "score threshold")


def test_profiles_and_configs_built_in_python_are_validated():
    from lossdoctor.inputs.config import SamplerConfig, TestConfig
    from lossdoctor.inputs.errors import InputError
    from lossdoctor.inputs.profiles import LossProfile, TermSpec
    from lossdoctor.vocab import LossKind

    with pytest.raises(InputError, match="normalizer 'level_smapled' is unknown"):
        TermSpec(LossKind.BCE, "level_smapled")
    with pytest.raises(InputError, match="weight must be >= 0"):
        TermSpec(LossKind.L1, weight=-1.0)
    with pytest.raises(InputError, match="rpn_box needs one of l1, smooth_l1"):
        LossProfile("p", rpn_box=TermSpec(LossKind.CE))
    with pytest.raises(InputError, match="batch_size"):
        SamplerConfig(batch_size=0)
    with pytest.raises(InputError, match="score threshold"):
        TestConfig(score_thr=1.5)
