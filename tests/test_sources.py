"""Sources: keys for every kind of --input, manifests, deduplication, duplicate keys, symlinks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from merge_cli.config import MediaOptions
from merge_cli.errors import UsageError
from merge_cli.inputs.sources import collect_samples
from merge_cli.media.images import decode_sample
from merge_cli.records import Failure, Item, Sample, escape_text


def touch(path: Path, content: bytes = b"x") -> Path:
    """Sources never open media: any bytes do."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def keys(sample_set) -> list[str]:
    return [sample.key for sample in sample_set.samples]


# --- folders --------------------------------------------------------------------------------------


def test_folder_keys_are_relative_sorted_and_posix(tmp_path):
    data = tmp_path / "data"
    for name in ["b.jpg", "a/z.png", "a/b/c.webp", "A.JPG", "clip.MP4", "notes.txt", "x.json", "README"]:
        touch(data / name)
    found = collect_samples([data])
    assert keys(found) == ["A.JPG", "a/b/c.webp", "a/z.png", "b.jpg", "clip.MP4"]
    assert found.ignored == 3 and found.failures == []
    by_key = {sample.key: sample for sample in found.samples}
    assert by_key["a/b/c.webp"].path == data / "a" / "b" / "c.webp" and by_key["a/b/c.webp"].path.is_absolute()
    assert by_key["clip.MP4"].kind == "video" and by_key["A.JPG"].kind == "image"


def test_folder_under_media_root_keys_relative_to_the_root(tmp_path):
    touch(tmp_path / "coco" / "train" / "1.jpg")
    found = collect_samples([tmp_path / "coco"], media_root=tmp_path)
    assert keys(found) == ["coco/train/1.jpg"]


def test_relative_input_paths_become_absolute(tmp_path, monkeypatch):
    touch(tmp_path / "data" / "a.jpg")
    monkeypatch.chdir(tmp_path)
    found = collect_samples(["data"])
    assert keys(found) == ["a.jpg"] and found.samples[0].path == tmp_path / "data" / "a.jpg"


def test_symlinked_folders_are_followed_and_loops_are_not(tmp_path):
    data = tmp_path / "data"
    touch(data / "real" / "a.jpg")
    touch(tmp_path / "elsewhere" / "b.png")
    os.symlink(tmp_path / "elsewhere", data / "linked")
    os.symlink(data, data / "real" / "loop")  # data/real/loop -> data: a cycle
    found = collect_samples([data])
    assert keys(found) == ["linked/b.png", "real/a.jpg"]  # real/loop leads back into data: skipped


def test_gif_kind_follows_gif_as_video(tmp_path):
    touch(tmp_path / "d" / "a.gif")
    assert collect_samples([tmp_path / "d"]).samples[0].kind == "image"
    assert collect_samples([tmp_path / "d"], gif_as_video=True).samples[0].kind == "video"


# --- single files ---------------------------------------------------------------------------------


def test_single_file_keys_as_its_name(tmp_path):
    path = touch(tmp_path / "deep" / "dir" / "cat.png")
    assert keys(collect_samples([path])) == ["cat.png"]
    assert keys(collect_samples([path], media_root=tmp_path)) == ["deep/dir/cat.png"]


def test_missing_input_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no such file or directory"):
        collect_samples([tmp_path / "nope"])


def test_unknown_single_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="not a folder, an image or video file, a .tar shard, a .parquet file, or a manifest"):
        collect_samples([touch(tmp_path / "a.docx")])


def test_media_root_must_be_a_folder(tmp_path):
    with pytest.raises(UsageError, match="--media-root"):
        collect_samples([touch(tmp_path / "a.jpg")], media_root=tmp_path / "missing")


# --- manifests ------------------------------------------------------------------------------------


def test_txt_manifest_resolves_against_its_own_folder(tmp_path):
    lists = tmp_path / "lists"
    touch(lists / "img" / "a.jpg")
    outside = touch(tmp_path / "other" / "b.png")
    manifest = lists / "files.txt"
    manifest.write_text(f"# a comment\nimg/a.jpg\n\n  ./img/../img/a.jpg  \n{outside}\nimg/missing.webp\n")
    found = collect_samples([manifest])
    assert keys(found) == ["img/a.jpg", outside.as_posix(), "img/missing.webp"]
    assert found.samples[0].path == lists / "img" / "a.jpg"
    # a missing file named by a manifest is a sample whose decoding is an error row
    failure = decode_sample(found.samples[2], MediaOptions())
    assert failure == Failure(
        "img/missing.webp", "open", "FileNotFoundError", f"no such file: {lists / 'img' / 'missing.webp'}"
    )


def test_txt_manifest_with_media_root(tmp_path):
    root = tmp_path / "media"
    touch(root / "x" / "a.jpg")
    manifest = tmp_path / "m.txt"
    manifest.write_text(f"x/a.jpg\n{root / 'x' / 'a.jpg'}\n")  # relative and absolute: one file, one key
    found = collect_samples([manifest], media_root=root)
    assert keys(found) == ["x/a.jpg"] and found.samples[0].path == root / "x" / "a.jpg"


def test_jsonl_manifest_fields(tmp_path):
    lines = [
        {"path": "a.jpg"},
        {"image": "b.png", "caption": "two birds"},
        {"video": "c.mp4"},
        {"text": "a text-only record is skipped"},
        {"image": ["d.jpg", "a.jpg"]},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    found = collect_samples([manifest])
    assert keys(found) == ["a.jpg", "b.png", "c.mp4", "d.jpg"]
    assert [sample.kind for sample in found.samples] == ["image", "image", "video", "image"]


def test_jsonl_bad_line_is_a_usage_error_with_its_line(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"path": "a.jpg"}\n{"path": \n')
    with pytest.raises(UsageError, match="m.jsonl line 2: not valid JSON"):
        collect_samples([manifest])


def test_llava_json_with_lists_of_images(tmp_path):
    records = [
        {"id": "0", "image": "coco/train2017/1.jpg", "conversations": []},
        {"id": "1", "image": ["ocr/2.png", "ocr/3.png"], "conversations": []},
        {"id": "2", "conversations": []},  # text-only
        {"id": "3", "video": "clips/4.mp4", "conversations": []},
        {"id": "4", "image": "coco/train2017/1.jpg", "conversations": []},  # the same image again
        {"id": "5", "image": None, "conversations": []},
    ]
    manifest = tmp_path / "llava.json"
    manifest.write_text(json.dumps(records))
    (tmp_path / "media").mkdir()
    found = collect_samples([manifest], media_root=tmp_path / "media")
    assert keys(found) == ["coco/train2017/1.jpg", "ocr/2.png", "ocr/3.png", "clips/4.mp4"]
    assert found.samples[0].path == tmp_path / "media" / "coco" / "train2017" / "1.jpg"
    assert found.samples[3].kind == "video"


def test_llava_json_must_be_a_list_of_records(tmp_path):
    manifest = tmp_path / "m.json"
    manifest.write_text('{"image": "a.jpg"}')
    with pytest.raises(UsageError, match="expected a list of records"):
        collect_samples([manifest])
    manifest.write_text('[{"image": 3}]')
    with pytest.raises(UsageError, match=r"m.json record 0: 'image' must be a path or a list of paths"):
        collect_samples([manifest])


def test_unknown_extension_in_a_manifest_is_a_source_failure(tmp_path):
    manifest = tmp_path / "m.txt"
    manifest.write_text("a.jpg\nnotes.docx\nb.png\n")
    found = collect_samples([manifest])
    assert keys(found) == ["a.jpg", "b.png"]
    assert found.failures == [
        Failure("notes.docx", "source", "UnsupportedMedia", ".docx: not a recognized image or video extension (m.txt line 2)")
    ]


# --- duplicates -----------------------------------------------------------------------------------


def test_duplicate_keys_name_both_sources(tmp_path):
    touch(tmp_path / "one" / "x.jpg")
    touch(tmp_path / "two" / "x.jpg")
    with pytest.raises(UsageError) as error:
        collect_samples([tmp_path / "one", tmp_path / "two"])
    message = str(error.value)
    assert "'x.jpg'" in message
    assert str(tmp_path / "one" / "x.jpg") in message and str(tmp_path / "two" / "x.jpg") in message
    assert f"--input {tmp_path / 'one'}" in message and f"--input {tmp_path / 'two'}" in message


def test_same_file_from_a_folder_and_a_manifest_is_one_sample(tmp_path):
    touch(tmp_path / "media" / "a.jpg")
    manifest = tmp_path / "m.txt"
    manifest.write_text("a.jpg\n")
    found = collect_samples([tmp_path / "media", manifest], media_root=tmp_path / "media")
    assert keys(found) == ["a.jpg"]


def test_order_is_deterministic(tmp_path):
    for name in ["q.jpg", "b/a.png", "m.webp", "b/c.jpg", "a.bmp"]:
        touch(tmp_path / "d" / name)
    first = collect_samples([tmp_path / "d"])
    assert first == collect_samples([tmp_path / "d"])
    assert keys(first) == sorted(keys(first))


# --- odd names ------------------------------------------------------------------------------------


def test_non_utf8_file_name_gets_an_escaped_key_and_still_decodes(tmp_path):
    from media_factory import make_image

    folder = tmp_path / "d"
    folder.mkdir()
    make_image(folder / "good.png", 56, 56)
    os.rename(folder / "good.png", os.fsdecode(os.fsencode(str(folder)) + b"/caf\xe9.png"))
    found = collect_samples([folder])
    assert keys(found) == ["caf\\xe9.png"]
    key = found.samples[0].key
    assert key.encode("utf-8") == b"caf\\xe9.png"  # valid UTF-8: storable in HDF5 and JSON
    item = decode_sample(found.samples[0], MediaOptions())
    assert isinstance(item, Item) and item.key == key


def test_escape_text_leaves_unicode_alone():
    assert escape_text("東京/café.jpg") == "東京/café.jpg"
    assert escape_text("caf\udce9.jpg") == "caf\\xe9.jpg"
    assert escape_text("odd\ud800.jpg") == "odd\\ud800.jpg"


def test_broken_symlink_and_directory_named_like_media(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    os.symlink(folder / "gone.jpg", folder / "link.jpg")
    (tmp_path / "dir.jpg").mkdir()
    manifest = tmp_path / "m.txt"
    manifest.write_text(f"{folder / 'link.jpg'}\ndir.jpg\n")
    found = collect_samples([manifest])
    assert keys(found) == ["d/link.jpg", "dir.jpg"]
    results = [decode_sample(sample, MediaOptions()) for sample in found.samples]
    assert results == [
        Failure("d/link.jpg", "open", "BrokenSymlink", f"broken symbolic link: {folder / 'link.jpg'} -> {folder / 'gone.jpg'}"),
        Failure("dir.jpg", "open", "IsADirectoryError", f"a directory, not a file: {tmp_path / 'dir.jpg'}"),
    ]


def test_samples_are_plain_records(tmp_path):
    path = touch(tmp_path / "a.jpg")
    assert collect_samples([path]).samples == [Sample("a.jpg", path, "image")]
