"""WebDataset tar shards and Parquet files as inputs: keys, decoding from memory, bad containers.

Tars are built with `tarfile` and Parquet files with pyarrow, on the fly, from freshly drawn
random pictures. Decoded pixels from a container are compared bit for bit with the same bytes
decoded as a loose file (same decoder, same bytes: they must be identical, tolerance 0).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from media_factory import make_video, random_rgb

from merge_cli.config import MediaOptions, VideoOptions
from merge_cli.errors import UsageError
from merge_cli.inputs.parquet import ParquetColumns
from merge_cli.inputs.sources import collect_samples
from merge_cli.inputs.webdataset import expand_pattern, split_member_name
from merge_cli.media import video
from merge_cli.media.images import decode_sample
from merge_cli.output.reader import open_features
from merge_cli.records import Failure, Item

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

CPU_FP32 = ["--device", "cpu", "--dtype", "fp32", "--workers", "0"]
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def encoded(height: int, width: int, fmt: str = "JPEG") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(random_rgb(height, width)).save(buffer, fmt)
    return buffer.getvalue()


def random_size() -> tuple[int, int]:
    return int(np.random.randint(60, 200)), int(np.random.randint(60, 200))


def make_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def make_parquet(path: Path, columns: dict, schema=None, row_group_size: int = 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns, schema=schema), path, row_group_size=row_group_size)
    return path


def by_key(sample_set) -> dict:
    return {sample.key: sample for sample in sample_set.samples}


def pixels(sample, options=None) -> torch.Tensor:
    item = decode_sample(sample, options or MediaOptions())
    assert isinstance(item, Item), item
    return item.pixels


def loose(tmp_path: Path, name: str, data: bytes):
    path = tmp_path / "loose" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return collect_samples([path]).samples[0]


# --- WebDataset --------------------------------------------------------------------------------


def test_member_names_split_as_webdataset_does():
    assert split_member_name("a/b/000123.jpg") == ("a/b/000123", "jpg")
    assert split_member_name("dir.v2/000123.Seg.PNG") == ("dir.v2/000123", "seg.png")
    assert split_member_name("noext") is None
    assert split_member_name("x/.hidden.jpg") is None


def test_tar_keys_kinds_and_ignored_members(tmp_path):
    images = {name: encoded(*random_size()) for name in ("a", "b", "c")}
    shard = make_tar(
        tmp_path / "s.tar",
        [
            ("part/000001.jpg", images["a"]),
            ("part/000001.json", b"{}"),
            ("part/000002.txt", b"caption"),
            ("part/000002.png", images["b"]),
            ("000003.json", b"{}"),  # no media: ignored
            ("__index__", b"meta"),  # WebDataset metadata: passed over
            ("readme", b"no dot"),
            ("000004.tar.jpg", images["c"]),  # key up to the first dot
        ],
    )
    found = collect_samples([shard])
    assert [s.key for s in found.samples] == ["part/000001", "part/000002", "000004"]
    assert all(s.kind == "image" for s in found.samples)
    assert found.ignored == 1 and found.failures == []
    for sample, name in zip(found.samples, ("a", "b", "c")):  # read in place: the very bytes
        assert torch.equal(pixels(sample), pixels(loose(tmp_path, f"{name}.jpg", images[name])))


def test_several_media_members_key_by_key_and_extension(tmp_path):
    left, right = encoded(*random_size()), encoded(*random_size(), "PNG")
    shard = make_tar(tmp_path / "s.tar", [("000005.left.jpg", left), ("000005.right.png", right), ("000005.json", b"{}")])
    found = by_key(collect_samples([shard]))
    assert sorted(found) == ["000005.left.jpg", "000005.right.png"]
    assert torch.equal(pixels(found["000005.left.jpg"]), pixels(loose(tmp_path, "l.jpg", left)))
    assert torch.equal(pixels(found["000005.right.png"]), pixels(loose(tmp_path, "r.png", right)))


def test_video_in_a_tar_decodes_from_memory_with_both_decoders(tmp_path, monkeypatch):
    clip = make_video(tmp_path / "clip.mp4", 12, 64, 96, fps=10)
    shard = make_tar(tmp_path / "v.tar", [("clip0.mp4", clip.read_bytes()), ("clip0.json", b"{}")])
    sample = by_key(collect_samples([shard]))["clip0"]
    assert sample.kind == "video"
    options = MediaOptions(video=VideoOptions(num_frames=5))
    reference = collect_samples([clip]).samples[0]
    for decoders, name in (((video.DecordSource,), "decord"), ((video.PyAVSource,), "pyav")):
        monkeypatch.setattr(video, "DECODERS", decoders)
        item, expected = decode_sample(sample, options), decode_sample(reference, options)
        assert isinstance(item, Item) and item.decoder == name
        assert item.frame_indices == expected.frame_indices and torch.equal(item.pixels, expected.pixels)


def test_folder_glob_and_brace_range_of_shards(tmp_path):
    folder = tmp_path / "shards"
    for number in range(3):
        make_tar(folder / f"{number:05d}.tar", [(f"s{number}.jpg", encoded(*random_size()))])
    expected = ["s0", "s1", "s2"]
    assert [s.key for s in collect_samples([folder]).samples] == expected
    assert [s.key for s in collect_samples([str(folder / "*.tar")]).samples] == expected
    assert [s.key for s in collect_samples([str(folder / "{00000..00002}.tar")]).samples] == expected
    assert expand_pattern("x/{008..010}.tar") == ["x/008.tar", "x/009.tar", "x/010.tar"]
    assert expand_pattern("{a,b}-{0..1}") == ["a-0", "a-1", "b-0", "b-1"]
    with pytest.raises(UsageError, match=r"00003\.tar does not exist"):
        collect_samples([str(folder / "{00000..00003}.tar")])
    with pytest.raises(UsageError, match="matches no file"):
        collect_samples([str(folder / "*.nothing")])
    (tmp_path / "c.tar.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(UsageError, match="compressed tar"):
        collect_samples([tmp_path / "c.tar.gz"])


def test_truncated_tar_keeps_every_complete_member(tmp_path):
    members = [(f"{index:03d}.jpg", encoded(*random_size())) for index in range(4)]
    whole = make_tar(tmp_path / "whole.tar", members).read_bytes()
    with tarfile.open(tmp_path / "whole.tar") as archive:
        third = archive.getmember("002.jpg")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[: third.offset_data + third.size // 2])  # inside the third member's data
    found = collect_samples([cut])
    assert [s.key for s in found.samples] == ["000", "001"]
    failures = {f.key: f for f in found.failures}
    assert failures["002"].error_type == "TruncatedTar" and "cut off" in failures["002"].message
    assert failures["cut.tar"].error_type == "TruncatedTar" and "after 001.jpg" in failures["cut.tar"].message
    for sample, (_, data) in zip(found.samples, members):
        assert torch.equal(pixels(sample), pixels(loose(tmp_path, "x.jpg", data)))

    header_cut = tmp_path / "header_cut.tar"
    header_cut.write_bytes(whole[: third.offset_data - 200])  # inside the third member's header
    found = collect_samples([header_cut])
    assert [s.key for s in found.samples] == ["000", "001"]
    assert [f.key for f in found.failures] == ["header_cut.tar"]


def test_bad_tars_and_members_become_records(tmp_path):
    good = encoded(*random_size())
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.tar").write_bytes(b"this is not a tar file at all" * 40)
    make_tar(tmp_path / "in" / "b.tar", [("good.jpg", good), ("broken.jpg", b"\xff\xd8 not really a jpeg"), ("empty.png", b"")])
    found = collect_samples([tmp_path / "in"])
    assert [f.key for f in found.failures] == ["a.tar"] and found.failures[0].error_type == "NotATar"
    results = {s.key: decode_sample(s, MediaOptions()) for s in found.samples}
    assert isinstance(results["good"], Item)
    assert (results["broken"].stage, results["broken"].error_type) == ("open", "UnidentifiedImageError")
    assert (results["empty"].stage, results["empty"].error_type) == ("open", "EmptyFile")


def test_two_samples_with_one_key_keep_the_first(tmp_path):
    first, second, third = (encoded(*random_size()) for _ in range(3))
    make_tar(tmp_path / "in" / "00000.tar", [("k.jpg", first), ("other.jpg", third)])
    make_tar(tmp_path / "in" / "00001.tar", [("k.jpg", second)])
    make_tar(tmp_path / "in" / "00002.tar", [("x.jpg", first), ("y.jpg", second), ("x.png", third)])  # x again, not adjacent
    found = collect_samples([tmp_path / "in"])
    keys = by_key(found)
    assert sorted(keys) == ["k", "other", "x", "y"]
    assert torch.equal(pixels(keys["k"]), pixels(loose(tmp_path, "k.jpg", first)))
    duplicates = {f.key: f for f in found.failures}
    assert set(duplicates) == {"00001.tar:k.jpg", "00002.tar:x.png"}
    assert all(f.error_type == "DuplicateKey" and "00000.tar" in duplicates["00001.tar:k.jpg"].message for f in duplicates.values())
    # the same shard named twice is listed once, without a record
    again = collect_samples([tmp_path / "in" / "00000.tar", tmp_path / "in" / "00000.tar"])
    assert [s.key for s in again.samples] == ["k", "other"] and again.failures == []


# --- Parquet ------------------------------------------------------------------------------------


def test_parquet_binary_and_datasets_struct_columns(tmp_path):
    images = [encoded(*random_size()) for _ in range(5)]
    plain = make_parquet(tmp_path / "plain.parquet", {"id": [f"p{i}" for i in range(5)], "image": images})
    structs = [{"bytes": data, "path": f"orig/{i}.jpg"} for i, data in enumerate(images)]
    structs[3] = None  # a text-only row: skipped
    hf = make_parquet(
        tmp_path / "hf.parquet",
        {"id": [f"h{i}" for i in range(5)], "image": pa.array(structs, IMAGE_STRUCT), "conversations": [[{"from": "human", "value": "hi"}]] * 5},
    )
    large = make_parquet(tmp_path / "large.parquet", {"id": [f"l{i}" for i in range(5)], "image": pa.array(images, pa.large_binary())}, row_group_size=3)
    found = collect_samples([plain, hf, large])
    keys = by_key(found)
    assert list(keys) == ["p0", "p1", "p2", "p3", "p4", "h0", "h1", "h2", "h4", "l0", "l1", "l2", "l3", "l4"]
    assert found.ignored == 1 and found.failures == []
    assert [keys[k].member.row_group for k in ("p0", "p2", "p4")] == [0, 1, 2]  # streamed by row group
    for index in range(5):
        reference = pixels(loose(tmp_path, f"{index}.jpg", images[index]))
        assert torch.equal(pixels(keys[f"p{index}"]), reference)
        assert torch.equal(pixels(keys[f"l{index}"]), reference)
        if index != 3:
            assert torch.equal(pixels(keys[f"h{index}"]), reference)


def test_parquet_columns_by_option_and_keys_without_an_id(tmp_path):
    images = [encoded(*random_size()) for _ in range(3)]
    clip = make_video(tmp_path / "clip.mp4", 8, 48, 64, fps=10).read_bytes()
    path = make_parquet(
        tmp_path / "d.parquet",
        {"name": [7, 8, 9], "jpeg": images, "movie": [None, clip, None]},
        row_group_size=3,
    )
    columns = ParquetColumns(image="jpeg", video="movie", key="name")
    found = collect_samples([path], columns=columns)
    kinds = [(s.key, s.kind) for s in found.samples]
    assert kinds == [("7", "image"), ("8", "image"), ("9", "image")]
    # row 1 has an image and a video under one key: the image keeps it
    assert [(f.key, f.error_type) for f in found.failures] == [("d.parquet:row 1", "DuplicateKey")]
    no_id = make_parquet(tmp_path / "noid.parquet", {"image": images})
    assert [s.key for s in collect_samples([no_id]).samples] == ["noid.parquet/0", "noid.parquet/1", "noid.parquet/2"]
    video_only = make_parquet(tmp_path / "v.parquet", {"id": ["v"], "video": [clip]})
    sample = collect_samples([video_only]).samples[0]
    item = decode_sample(sample, MediaOptions(video=VideoOptions(num_frames=4)))
    assert isinstance(item, Item) and item.kind == "video" and item.num_frames == 4


def test_parquet_struct_with_only_a_path_reads_the_file(tmp_path):
    data = encoded(*random_size())
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "a.jpg").write_bytes(data)
    path = make_parquet(
        tmp_path / "p.parquet",
        {"id": ["a", "gone"], "image": pa.array([{"bytes": None, "path": "files/a.jpg"}, {"bytes": None, "path": "files/none.jpg"}], IMAGE_STRUCT)},
    )
    keys = by_key(collect_samples([path]))
    assert torch.equal(pixels(keys["a"]), pixels(loose(tmp_path, "a.jpg", data)))
    assert decode_sample(keys["gone"], MediaOptions()).error_type == "FileNotFoundError"


def test_bad_parquet_inputs(tmp_path):
    good = encoded(*random_size())
    (tmp_path / "fake.parquet").write_bytes(b"PAR1 but not really" * 10)
    ok = make_parquet(tmp_path / "ok.parquet", {"id": ["a", "b", None], "image": pa.array([{"bytes": good, "path": None}, {"bytes": None, "path": None}, {"bytes": good, "path": None}], IMAGE_STRUCT)})
    found = collect_samples([tmp_path / "fake.parquet", ok])
    failures = {f.key: f for f in found.failures}
    assert failures["fake.parquet"].error_type == "NotParquet"
    assert failures["ok.parquet/2"].error_type == "NullKey"
    keys = by_key(found)
    assert isinstance(decode_sample(keys["a"], MediaOptions()), Item)
    null = decode_sample(keys["b"], MediaOptions())
    assert isinstance(null, Failure) and (null.stage, null.error_type) == ("open", "NullImage")

    wrong = make_parquet(tmp_path / "wrong.parquet", {"id": ["a"], "image": [3]})
    with pytest.raises(UsageError, match=r"column 'image' is int64; expected"):
        collect_samples([wrong])
    with pytest.raises(UsageError, match=r"no key column 'uid'"):
        collect_samples([ok], columns=ParquetColumns(key="uid"))
    with pytest.raises(UsageError, match=r"no column 'pixels' \(--image-column\)"):
        collect_samples([ok], columns=ParquetColumns(image="pixels"))
    nested_key = make_parquet(tmp_path / "nk.parquet", {"id": [[1]], "image": [good]})
    with pytest.raises(UsageError, match="key column 'id' is list"):
        collect_samples([nested_key])
    no_media = make_parquet(tmp_path / "text.parquet", {"id": ["a"], "text": ["hi"]})
    with pytest.raises(UsageError, match="no 'image' or 'video' column"):
        collect_samples([no_media])


def test_parquet_without_pyarrow_is_refused_naming_the_extra(tmp_path, monkeypatch):
    path = make_parquet(tmp_path / "d.parquet", {"image": [encoded(60, 60)]})
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(UsageError, match=r"needs pyarrow: pip install 'merge-cli\[parquet\]'"):
        collect_samples([path])


def test_bad_inputs_through_the_cli_are_records_or_one_line(cli, tmp_path):
    good = encoded(*random_size())
    make_tar(tmp_path / "in" / "a.tar", [("good.jpg", good), ("bad.jpg", b"garbage")])
    (tmp_path / "in" / "b.parquet").write_bytes(b"not parquet")
    result = cli("extract", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "f.h5"), *CPU_FP32, "--json")
    summary = json.loads(result.stdout)
    assert result.exit_code == 3 and summary["written"] == 1 and summary["failed"] == 2
    with open_features(tmp_path / "f.h5") as feats:
        assert feats.keys() == ["good"]
    wrong = make_parquet(tmp_path / "w.parquet", {"id": ["a"], "image": ["text, not bytes"]})
    result = cli("extract", "--input", str(wrong), "--out", str(tmp_path / "g.h5"), *CPU_FP32)
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if "demo tower" not in line]
    assert len(lines) == 1 and "column 'image' is string" in lines[0]


# --- the same images three ways -------------------------------------------------------------------


def test_folder_tars_and_parquet_give_identical_tokens(cli, tmp_path):
    names = [f"img{index:02d}" for index in range(6)]
    data = {name: encoded(*random_size()) for name in names}
    for name in names:
        (tmp_path / "folder" / f"{name}.jpg").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "folder" / f"{name}.jpg").write_bytes(data[name])
    make_tar(tmp_path / "tars" / "00000.tar", [(f"{n}.jpg", data[n]) for n in names[:4]] + [(f"{names[0]}.json", b"{}")])
    make_tar(tmp_path / "tars" / "00001.tar", [(f"{n}.jpg", data[n]) for n in names[4:]])
    make_parquet(
        tmp_path / "pq" / "train-00000.parquet",
        {"id": names, "image": pa.array([{"bytes": data[n], "path": None} for n in names], IMAGE_STRUCT)},
    )
    outputs = {}
    for label, given in (("folder", tmp_path / "folder"), ("tars", tmp_path / "tars" / "{00000..00001}.tar"), ("pq", tmp_path / "pq")):
        out = tmp_path / f"{label}.h5"
        result = cli("extract", "--input", str(given), "--out", str(out), *CPU_FP32, "--batch-tokens", "512")
        assert result.exit_code == 0, result.output
        outputs[label] = out
    with open_features(outputs["folder"]) as folder, open_features(outputs["tars"]) as tars, open_features(outputs["pq"]) as table:
        assert sorted(folder.keys()) == [f"{n}.jpg" for n in names]
        assert sorted(tars.keys()) == names and sorted(table.keys()) == names
        for name in names:
            reference = folder[f"{name}.jpg"].tokens
            assert torch.equal(tars[name].tokens, reference) and torch.equal(table[name].tokens, reference)


# --- resume ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_after_kill_9_mid_shard(tmp_path):
    rng = np.random.default_rng(np.random.randint(0, 2**31))
    for shard in range(2):
        members = []
        for index in range(60):
            height, width = 112 + 28 * int(rng.integers(0, 5)), 140 + 14 * int(rng.integers(0, 7))
            members.append((f"s{shard}/{index:03d}.png", encoded(height, width, "PNG")))
        make_tar(tmp_path / "tars" / f"{shard:05d}.tar", members)
    clean, killed = tmp_path / "clean.h5", tmp_path / "killed.h5"
    command = [sys.executable, "-m", "merge_cli", "extract", "--input", str(tmp_path / "tars"), *CPU_FP32, "--batch-tokens", "64"]
    done = subprocess.run([*command, "--out", str(clean)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr

    process = subprocess.Popen([*command, "--out", str(killed), "--shard-size", "30kB"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = killed.parent / (killed.name + ".d")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if shards.is_dir() and len(list(shards.glob("*.h5"))) >= 2:
            break
        time.sleep(0.01)
    assert process.poll() is None, "the run finished before it could be killed; make the shards larger"
    os.kill(process.pid, signal.SIGKILL)  # in the middle of the first tar shard
    process.wait()

    resumed = subprocess.run([*command, "--out", str(killed), "--shard-size", "30kB", "--json"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert 0 < summary["skipped"] < 60 and summary["written"] + summary["skipped"] == 120
    with open_features(clean) as a, open_features(killed) as b:
        assert sorted(a.keys()) == sorted(b.keys()) and len(a.keys()) == 120
        for key in a.keys():
            torch.testing.assert_close(b[key].tokens, a[key].tokens, rtol=1e-6, atol=1e-6)


def test_plan_from_headers_matches_decoding_inside_containers(tmp_path):
    from merge_cli.media.images import plan_sample

    image = encoded(*random_size())
    clip = make_video(tmp_path / "clip.mp4", 10, 48, 64, fps=10).read_bytes()
    shard = make_tar(tmp_path / "s.tar", [("a.jpg", image), ("b.mp4", clip)])
    table = make_parquet(tmp_path / "p.parquet", {"id": ["c", "d"], "image": [image, None], "video": [None, clip]})
    options = MediaOptions(video=VideoOptions(num_frames=4))
    samples = collect_samples([shard]).samples + collect_samples([table]).samples
    assert [(s.key, s.kind) for s in samples] == [("a", "image"), ("b", "video"), ("c", "image"), ("d", "video")]
    for sample in samples:
        item = decode_sample(sample, options)
        assert isinstance(item, Item), item
        patch = options.policy.patch_size
        assert plan_sample(sample, options) == (item.num_frames, item.resized_hw[0] // patch, item.resized_hw[1] // patch)
