"""ImageNet's three downloads in miniature, in their real layouts, with real JPEG files: what the tests and
bench/bench_imagenet.py stage and read. Standard library, numpy, PIL and scipy only (no pytest: the benchmarks run
where it is not installed)."""


def jpeg_bytes(rng, size, label=0, quality=90):
    """A real JPEG file's bytes: noise around a colour that depends on the label (so classes are learnable)."""
    import io

    import numpy as np
    from PIL import Image

    base = np.array([(label * 67) % 256, (label * 141) % 256, (label * 29 + 100) % 256])
    pixels = np.clip(base + rng.normal(0, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def tar_add(tar, name, data):
    import io
    import tarfile
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def imagenet_wnids(n_classes):
    """Class ids in ImageNet's form (nXXXXXXXX), in archive order."""
    return [f"n{1440764 + 1000 * k:08d}" for k in range(n_classes)]


def make_imagenet_train_tar(path, n_classes=3, n_images=4, size=(50, 40), seed=0):
    """A real ILSVRC2012_img_train.tar in miniature: one tar per class (nXXXXXXXX.tar) of real JPEG files
    nXXXXXXXX_N.JPEG, written with PIL. Returns the class ids (wnids) in archive order."""
    import io
    import tarfile

    import numpy as np

    rng = np.random.default_rng(seed)
    wnids = imagenet_wnids(n_classes)
    with tarfile.open(path, "w") as outer:
        for label, wnid in enumerate(wnids):
            inner_bytes = io.BytesIO()
            with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
                for i in range(n_images):
                    tar_add(inner, f"{wnid}_{i + 1}.JPEG", jpeg_bytes(rng, size, label))
            tar_add(outer, f"{wnid}.tar", inner_bytes.getvalue())
    return wnids


def make_imagenet_archives(folder, n_classes=3, n_train=4, n_val=2, size=(50, 40), seed=0):
    """The three ImageNet downloads in miniature, in their real layouts: ILSVRC2012_img_train.tar (per-class tars),
    ILSVRC2012_img_val.tar (flat ILSVRC2012_val_NNNNNNNN.JPEG files, classes interleaved) and
    ILSVRC2012_devkit_t12.tar.gz
    (data/meta.mat with the synsets and data/ILSVRC2012_validation_ground_truth.txt with one ILSVRC id per val image).
    The ILSVRC ids run in reverse wnid order, and meta.mat also holds a non-leaf synset, as the real one does.
    Returns (wnids, the wnid of each validation image)."""
    import tarfile

    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    wnids = make_imagenet_train_tar(folder / "ILSVRC2012_img_train.tar", n_classes, n_train, size, seed)
    rng = np.random.default_rng(seed + 1)
    val_labels = val_labels_of(n_val * n_classes, n_classes)
    with tarfile.open(folder / "ILSVRC2012_img_val.tar", "w") as tar:
        for i, label in enumerate(val_labels):
            tar_add(tar, f"ILSVRC2012_val_{i + 1:08d}.JPEG", jpeg_bytes(rng, size, label))
    write_devkit(folder, wnids, val_labels)
    return wnids, [wnids[label] for label in val_labels]


def val_labels_of(n_images, n_classes):
    """The class of each validation image: classes interleaved, as in the real val tar."""
    return [(i * 7) % n_classes for i in range(n_images)]


def write_devkit(folder, wnids, val_labels):
    """ILSVRC2012_devkit_t12.tar.gz: data/meta.mat (the synsets; ILSVRC ids in reverse wnid order, and a non-leaf
    synset, as in the real one) and data/ILSVRC2012_validation_ground_truth.txt (one ILSVRC id per val image)."""
    import io
    import tarfile

    import numpy as np
    import scipy.io

    n_classes = len(wnids)
    ilsvrc_id = {w: n_classes - k for k, w in enumerate(wnids)}
    synsets = np.zeros(n_classes + 1,
                       dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")])
    for k, w in enumerate(wnids):
        synsets[k] = (ilsvrc_id[w], w, f"class {k}", 0)
    synsets[n_classes] = (n_classes + 1, "n00001740", "entity", 2)
    mat = io.BytesIO()
    scipy.io.savemat(mat, {"synsets": synsets})
    truth = "".join(f"{ilsvrc_id[wnids[label]]}\n" for label in val_labels).encode()
    with tarfile.open(folder / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
        tar_add(tar, "ILSVRC2012_devkit_t12/data/meta.mat", mat.getvalue())
        tar_add(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", truth)
