"""extract_some_samples.sh on a real (tiny) ILSVRC2012-layout train tar of JPEG files."""
from PIL import Image

from conftest import REPO, make_imagenet_train_tar, run

SCRIPT = str(REPO / "extract_some_samples.sh")


def test_extracts_the_first_classes_and_images_only(tmp_path):
    tar = tmp_path / "ILSVRC2012_img_train.tar"
    wnids = make_imagenet_train_tar(tar, n_classes=4, n_images=5)
    rc, out = run(["bash", SCRIPT, str(tar), str(tmp_path / "peek"), "2", "3"], timeout=60)
    assert rc == 0, out
    assert sorted(p.name for p in (tmp_path / "peek").iterdir()) == wnids[:2]
    for wnid in wnids[:2]:
        files = sorted((tmp_path / "peek" / wnid).iterdir())
        assert [f.name for f in files] == [f"{wnid}_{i}.JPEG" for i in (1, 2, 3)]
        for f in files:
            with Image.open(f) as im:
                assert im.format == "JPEG" and im.size == (50, 40)
    assert "extracted 2 classes" in out


def test_usage_and_missing_tar(tmp_path):
    rc, out = run(["bash", SCRIPT], timeout=30)
    assert rc == 2 and "extract_some_samples.sh TAR DEST" in out
    rc, out = run(["bash", SCRIPT, str(tmp_path / "nope.tar"), str(tmp_path / "d")], timeout=30)
    assert rc == 1 and "no such tar file" in out
    rc, out = run(["bash", SCRIPT, str(tmp_path / "nope.tar"), str(tmp_path / "d"), "zero"], timeout=30)
    assert rc == 2 and "positive integers" in out
    assert not (tmp_path / "d").exists()


def test_a_tar_without_class_tars_is_refused(tmp_path):
    flat = tmp_path / "val.tar"
    make_imagenet_train_tar(tmp_path / "train.tar", n_classes=1, n_images=2)
    run(["tar", "-cf", str(flat), "-C", str(tmp_path), "train.tar"])  # a tar of a tar named train.tar: not nXXXX.tar
    rc, out = run(["bash", SCRIPT, str(flat), str(tmp_path / "d")], timeout=30)
    assert rc == 1 and "no per-class tars" in out
