"""The DALI backend (pipeline/dali.py) on DALI's CPU pipelines: same order, same
augmentation draws and (nearly) the same pixels as the PIL reference."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from iecl.pipeline import BatchPlan, DaliOptions, DataError, scan_image_folder
from iecl.pipeline.augment import ViewRecipe, get_recipe
from iecl.pipeline.dali import DaliLoader
from iecl.pipeline.reference import ReferenceLoader
from iecl.pipeline.sampler import EpochBatchSampler
from iecl.pipeline.synthetic import SyntheticSpec, make_synthetic

CPU = torch.device("cpu")
MOCOV2 = get_recipe("mocov2")
# Every random step off; crops still random, so resampling is exercised.
PLAIN = ViewRecipe(crop_scale=(0.3, 1.0), jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, flip_prob=0.0)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """24 ImageNet-like JPEGs, one class each: a label names its image (label == index)."""
    root = tmp_path_factory.mktemp("dali") / "unique"
    make_synthetic(root, SyntheticSpec(24, 24, seed=11), workers=1, progress=False)
    return scan_image_folder(root)


def _dali(images, *, recipes=MOCOV2, batch=4, size=32, seed=0, workers=0, rank=0, world_size=1, **kw) -> DaliLoader:
    return DaliLoader(images, BatchPlan(recipes, batch, size, seed, workers, CPU, rank, world_size), **kw)


def _epoch(loader, epoch: int, start_batch: int = 0) -> list:
    loader.set_epoch(epoch, start_batch)
    return list(loader)


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.anchor, y.anchor) and torch.equal(x.query, y.query) and torch.equal(x.label, y.label)
        for x, y in zip(a, b)
    )


def _mad(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


def test_batches_shape_dtype_order_and_length(images):
    loader = _dali(images)
    sampler = EpochBatchSampler(len(images), 4, seed=0)
    for epoch in (0, 1):
        batches = _epoch(loader, epoch)
        assert len(batches) == len(loader) == sampler.batches == 6
        for k, b in enumerate(batches):
            assert b.anchor.shape == b.query.shape == (4, 32, 32, 3)
            assert b.anchor.dtype == b.query.dtype == torch.uint8 and b.label.dtype == torch.int64
            assert b.anchor.is_contiguous() and b.query.is_contiguous() and b.anchor.device == CPU
            # one class per image: the labels are the sampler's indices, batch by batch
            assert b.label.tolist() == sampler.indices(epoch)[k * 4 : (k + 1) * 4].tolist()
        b = batches[0]
        assert not torch.equal(b.anchor, b.query)  # two independent augmentations
        assert b.anchor.float().std() > 10 and 0 <= b.anchor.min() and b.anchor.max() <= 255
    assert loader.bad_files == []
    loader.close()
    loader.close()  # idempotent


def test_same_batches_and_pixels_as_reference(images):
    """Plain crops match PIL to a grey level; with MoCo-v2's recipe the views'
    statistics agree (DALI's hue rotation and blur differ slightly from PIL's)."""
    for recipe, bound in ((PLAIN, 2.0), (MOCOV2[0], None)):
        dali = _epoch(_dali(images, recipes=(recipe, recipe), size=48), 1)
        ref = _epoch(ReferenceLoader(images, BatchPlan((recipe, recipe), 4, 48, 0, 0, CPU)), 1)
        assert [b.label.tolist() for b in dali] == [b.label.tolist() for b in ref]
        if bound is not None:
            for d, r in zip(dali, ref):
                assert _mad(d.anchor, r.anchor) < bound and _mad(d.query, r.query) < bound
        else:
            views_d = torch.cat([torch.cat([b.anchor, b.query]) for b in dali]).float()
            views_r = torch.cat([torch.cat([b.anchor, b.query]) for b in ref]).float()
            assert torch.allclose(views_d.mean((0, 1, 2)), views_r.mean((0, 1, 2)), atol=10)
            assert torch.allclose(views_d.std((0, 1, 2)), views_r.std((0, 1, 2)), atol=10)
            assert _mad(views_d, views_r) < 8  # the same draws, not just the same statistics


ONE_STEP = {
    "grayscale": {"grayscale_prob": 1.0},
    "solarize": {"solarize_prob": 1.0},
    "flip": {"flip_prob": 1.0},
    "blur": {"blur_prob": 1.0},
    "brightness_contrast": {"jitter_prob": 1.0, "saturation": 0.0, "hue": 0.0},
    "saturation": {"jitter_prob": 1.0, "brightness": 0.0, "contrast": 0.0, "hue": 0.0},
    "hue": {"jitter_prob": 1.0, "brightness": 0.0, "contrast": 0.0, "saturation": 0.0},
    "jitter": {"jitter_prob": 1.0},  # DALI's fixed order vs the sampled one
}


@pytest.mark.parametrize("step", ONE_STEP)
def test_each_augmentation_matches_reference(images, step):
    recipe = replace(PLAIN, **ONE_STEP[step])
    dali = _epoch(_dali(images, recipes=(recipe, PLAIN), batch=8, size=32), 0)[0]
    ref = _epoch(ReferenceLoader(images, BatchPlan((recipe, PLAIN), 8, 32, 0, 0, CPU)), 0)[0]
    assert _mad(dali.anchor, ref.anchor) < (6.0 if step == "jitter" else 2.0)
    assert _mad(dali.anchor, dali.query) > 2.0 or step == "flip"  # the step did something


def test_executor_and_threads_options(images):
    """The executor and thread options reach DALI and change no pixel."""
    plain = _epoch(_dali(images), 0)
    tuned = _epoch(_dali(images, options=DaliOptions(exec_dynamic=True, threads=1, prefetch=1)), 0)
    assert _same(plain, tuned)


def test_arithmetic_contrast_is_the_same(images):
    """The GPU graph's contrast (arithmetic on the device), run on the CPU."""
    recipe = replace(PLAIN, **ONE_STEP["brightness_contrast"])
    op = _epoch(_dali(images, recipes=(recipe, recipe)), 0)
    arithmetic = _epoch(_dali(images, recipes=(recipe, recipe), options=DaliOptions(arithmetic_contrast=True)), 0)
    for a, b in zip(op, arithmetic):
        assert (a.anchor.int() - b.anchor.int()).abs().max() <= 1


def test_fast_hue_is_a_hue_shift(images):
    """dali.exact_hue=false: DALI's YIQ rotation, the same direction as PIL's shift."""
    recipe = replace(PLAIN, **ONE_STEP["hue"])
    ref = _epoch(ReferenceLoader(images, BatchPlan((recipe, PLAIN), 8, 32, 0, 0, CPU)), 0)[0]
    fast = _epoch(_dali(images, recipes=(recipe, PLAIN), batch=8, size=32, options=DaliOptions(exact_hue=False)), 0)[0]
    exact = _epoch(_dali(images, recipes=(recipe, PLAIN), batch=8, size=32), 0)[0]
    assert not torch.equal(fast.anchor, exact.anchor)  # the option reaches the graph
    unshifted = _epoch(_dali(images, recipes=(PLAIN, PLAIN), batch=8, size=32), 0)[0]  # same crops, no hue
    assert _mad(fast.anchor, ref.anchor) < _mad(unshifted.anchor, ref.anchor)  # a rough approximation


def test_workers_seeds_epochs(images):
    inline = _epoch(_dali(images), 1)
    parallel_loader = _dali(images, workers=2)
    assert _same(_epoch(parallel_loader, 1), inline)
    parallel_loader.close()
    assert not torch.equal(_epoch(_dali(images, seed=1), 1)[0].anchor, inline[0].anchor)
    assert not torch.equal(_epoch(_dali(images), 2)[0].anchor, inline[0].anchor)


@pytest.mark.parametrize("workers", [0, 2])
def test_set_epoch_resumes_and_continues(images, workers):
    fresh = {e: _epoch(_dali(images), e) for e in (0, 1)}
    loader = _dali(images, workers=workers)
    assert _same(_epoch(loader, 0, start_batch=4), fresh[0][4:])  # a resumed run
    pipe = loader._pipe
    assert _same(_epoch(loader, 1), fresh[1])  # the next epoch: DALI continues, no restart
    assert loader._pipe is pipe
    assert _same(_epoch(loader, 1, start_batch=2), fresh[1][2:])  # a jump: restarted there
    assert _same(_epoch(loader, 1), fresh[1])  # the same epoch again
    assert _epoch(loader, 0, start_batch=len(loader)) == []
    assert len(loader) == 6
    loader.close()


def test_ranks_are_disjoint_and_cover_the_epoch(images):
    seen = []
    for rank in (0, 1):
        loader = _dali(images, rank=rank, world_size=2)
        labels = torch.cat([b.label for b in _epoch(loader, 3)]).tolist()
        assert len(loader) == 3 and len(labels) == 12
        seen.append(set(labels))
    # 24 images = 3 batches x 4 x 2 ranks: nothing dropped, every image seen once
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(len(images)))


def test_decode_window_matches_shared(images):
    shared = _epoch(_dali(images, size=48, decode="shared"), 0)
    window = _epoch(_dali(images, size=48, decode="window"), 0)
    for s, w in zip(shared, window):
        assert torch.equal(s.label, w.label)
        assert _mad(s.anchor, w.anchor) < 2.0 and _mad(s.query, w.query) < 2.0
    with pytest.raises(ValueError, match="decode mode"):
        _dali(images, decode="partial")


def test_bad_files_are_replaced_and_named(tmp_path, images):
    root = tmp_path / "broken" / "a"
    root.mkdir(parents=True)
    for i in range(7):
        (root / f"ok{i}.JPEG").write_bytes(Path(images.samples[i][0]).read_bytes())
    data = (root / "ok3.JPEG").read_bytes()
    (root / "ok3.JPEG").write_bytes(data[: len(data) // 3])  # truncated: no end-of-image marker
    (root / "zz.JPEG").write_bytes(b"not a jpeg at all")
    broken = scan_image_folder(root.parent)
    loader = _dali(broken, batch=8, workers=2)  # (files: DALI's threads read them, workers or not)
    with pytest.warns(UserWarning, match="cannot read"):
        (batch,) = _epoch(loader, 0)
    assert batch.anchor.shape == (8, 32, 32, 3) and batch.anchor.float().std() > 10
    assert sorted(name.split(" (")[0] for name in loader.bad_files) == ["a/ok3.JPEG", "a/zz.JPEG"]
    _epoch(loader, 1)
    assert len(loader.bad_files) == 2  # cumulative, each file once
    loader.close()


def test_all_unreadable_raise_and_a_corrupt_body_is_skipped(tmp_path, images):
    garbage = tmp_path / "garbage" / "a"
    garbage.mkdir(parents=True)
    for i in range(4):
        (garbage / f"x{i}.jpg").write_bytes(b"\x89PNG but not really")
    with pytest.raises(DataError, match="none of the 4 images"):
        _epoch(_dali(scan_image_folder(garbage.parent)), 0)

    # A PNG whose header and IEND are fine but whose pixel data is not: PIL's full
    # decode rejects it, so DALI never sees it (one decision of what is readable).
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(buf, "PNG")
    png = bytearray(buf.getvalue())
    start = png.find(b"IDAT") + 8
    png[start : start + 200] = bytes(200)
    corrupt = tmp_path / "corrupt" / "a"
    corrupt.mkdir(parents=True)
    for i in range(3):
        (corrupt / f"ok{i}.JPEG").write_bytes(Path(images.samples[i][0]).read_bytes())
    (corrupt / "zz.png").write_bytes(bytes(png))
    loader = _dali(scan_image_folder(corrupt.parent))
    with pytest.warns(UserWarning, match="cannot read"):
        (batch,) = _epoch(loader, 0)
    assert [name.split(" (")[0] for name in loader.bad_files] == ["a/zz.png"]
    assert batch.anchor.float().std() > 10


def test_missing_dali_is_a_data_error(images, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # what `import` sees when DALI is not installed
    with pytest.raises(DataError, match="pip install nvidia-dali"):
        _dali(images)


@pytest.fixture(autouse=True)
def _index_cache_in_tmp(tmp_path, monkeypatch):
    """The image index is cached under ~/.cache/iecl/index by default: not the user's, in tests."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def _corrupt_body(jpeg: bytes) -> bytes:
    """The header and end marker intact, 3 kB of the entropy-coded scan replaced by noise:
    PIL rejects it ("broken data stream"); DALI's decoders decode it without an error."""
    scan = jpeg.find(b"\xff\xda") + 600
    noise = np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    return jpeg[:scan] + noise + jpeg[scan + 3000 :]


def test_a_corrupt_body_is_skipped_and_named_as_pil_names_it(tmp_path, images):
    root = tmp_path / "corrupt" / "a"
    root.mkdir(parents=True)
    for i in range(7):
        (root / f"ok{i}.JPEG").write_bytes(Path(images.samples[i][0]).read_bytes())
    (root / "ok2.JPEG").write_bytes(_corrupt_body((root / "ok2.JPEG").read_bytes()))
    broken = scan_image_folder(root.parent)
    dali = _dali(broken, batch=7)
    with pytest.warns(UserWarning, match="cannot read"):
        _epoch(dali, 0)
    pil = ReferenceLoader(broken, BatchPlan(MOCOV2, 7, 32, 0, 0, CPU))
    _epoch(pil, 0)
    assert dali.bad_files == pil.bad_files == [f"a/ok2.JPEG ({dali.index.reasons[2]})"]
    assert "broken data stream" in dali.bad_files[0]


def _exif_jpeg(source: bytes, orientation: int) -> bytes:
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(source)).convert("RGB")
    exif = img.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("decode", ["shared", "window"])
def test_exif_rotated_images_are_cropped_as_pil_crops_them(tmp_path, images, decode):
    root = tmp_path / "exif" / "a"
    root.mkdir(parents=True)
    for i in range(8):
        (root / f"r{i}.JPEG").write_bytes(_exif_jpeg(Path(images.samples[i][0]).read_bytes(), (1, 6, 8, 3)[i % 4]))
    rotated = scan_image_folder(root.parent)
    dali = _epoch(_dali(rotated, recipes=(PLAIN, PLAIN), batch=8, size=48, decode=decode), 0)[0]
    ref = _epoch(ReferenceLoader(rotated, BatchPlan((PLAIN, PLAIN), 8, 48, 0, 0, CPU)), 0)[0]
    assert _mad(dali.anchor, ref.anchor) < 3.0 and _mad(dali.query, ref.query) < 3.0


def test_the_index_is_built_once_and_follows_changes(tmp_path, images, monkeypatch):
    from iecl.pipeline import index as index_module

    decoded = []
    real = index_module.inspect_image
    monkeypatch.setattr(index_module, "inspect_image", lambda data: decoded.append(1) or real(data))
    root = tmp_path / "indexed" / "a"
    root.mkdir(parents=True)
    for i in range(6):
        (root / f"x{i}.JPEG").write_bytes(Path(images.samples[i][0]).read_bytes())
    folder = scan_image_folder(root.parent)
    options = DaliOptions(index_cache=str(tmp_path / "cache"))
    first = _dali(folder, options=options).index
    assert len(decoded) == 6 and first.reasons == {}
    again = _dali(folder, options=options).index
    assert len(decoded) == 6 and np.array_equal(again.sizes, first.sizes)  # nothing decoded again
    (root / "x4.JPEG").write_bytes(b"truncated")
    changed = _dali(folder, options=options).index
    assert len(decoded) == 7 and list(changed.reasons) == [4]  # only the changed file
    assert changed.replacements().tolist() == [0, 1, 2, 3, 5, 5]


def test_no_header_is_parsed_while_loading(images, monkeypatch):
    """After the index, the hot path reads no image in Python: not a header, not a byte."""
    loader = _dali(images)
    from iecl.pipeline import decode, folder, index

    def forbidden(*args, **kwargs):
        raise AssertionError("an image was opened in Python while loading")

    for module, name in ((decode, "inspect_image"), (index, "inspect_image"), (folder.ImageList, "read")):
        monkeypatch.setattr(module, name, forbidden)
    assert len(_epoch(loader, 0)) == 6
    loader.close()


def test_view_vectors_are_the_per_sample_vectors():
    from iecl.pipeline.dali_source import view_vector, view_vectors
    from iecl.pipeline.draws import draw_views

    n = 300
    rng = np.random.default_rng(2)
    for recipe in (*MOCOV2, *get_recipe("byol")):
        draws = draw_views(recipe, 1, 2, 0, np.arange(n), rng.integers(1, 500, n), rng.integers(1, 500, n), 64)
        assert np.array_equal(view_vectors(draws), np.stack([view_vector(p) for p in draws.as_params()]))


def test_files_reach_dali_as_paths_and_shards_as_bytes(tmp_path, images):
    """The batch source hands DALI paths (its threads read the files) and one
    call gives a whole batch; tar members, which have no path, come as bytes."""
    import tarfile

    from iecl.pipeline import open_images

    loader = _dali(images)
    data, label, skipped, anchor, query = _source(loader).batch(0, 1)
    assert data.dtype == np.uint8 and data.shape[0] == 4  # one dense array: no per-sample feeding in DALI
    assert [bytes(p).rstrip(b"\0").decode() for p in data] == [images.samples[i][0] for i in label.tolist()]
    assert anchor.shape == query.shape == (4, 19) and skipped.tolist() == [0] * 4
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(12):
            tar.add(images.samples[i][0], arcname=f"{i:04d}.jpg")
    members = open_images(shard)
    data = _source(_dali(members)).batch(0, 0)[0]
    assert all(bytes(d[:2]) == b"\xff\xd8" for d in data)  # JPEG bytes
    inline, parallel = _dali(members), _dali(members, workers=2)
    assert _same(_epoch(inline, 1), _epoch(parallel, 1))
    parallel.close()


def _source(loader):
    from iecl.pipeline.dali_source import BatchSource

    return BatchSource(loader.images, loader.index, loader.plan, loader.sampler, 0, 0)


@pytest.mark.parametrize("decode", ["shared", "window"])
def test_decode_only_reads_the_same_batches_and_decodes_them(images, decode):
    """DaliDecodeOnly (the decode-only timing of `iecl bench loader`): the loader's
    batches, labels and length, one one-pixel output per decode, no views."""
    from iecl.pipeline.dali import DaliDecodeOnly

    full = _epoch(_dali(images, decode=decode), 1)
    only = _dali_decode_only(images, decode=decode)
    batches = _epoch(only, 1)
    assert len(batches) == len(full) == len(only) == 6
    for (pixels, label), views in zip(batches, full):
        assert torch.equal(label, views.label)
        assert len(pixels) == (1 if decode == "shared" else 2)
        assert all(p.shape == (4, 1, 1, 3) and p.dtype == torch.uint8 for p in pixels)
    assert batches[0][0][0].float().std() > 0  # decoded pixels, not a constant
    assert isinstance(only, DaliDecodeOnly) and only.bad_files == []
    only.close()


def _dali_decode_only(images, *, batch=4, size=32, **kw):
    from iecl.pipeline.dali import DaliDecodeOnly

    return DaliDecodeOnly(images, BatchPlan(MOCOV2, batch, size, 0, 0, CPU), **kw)


def test_hw_decoder_load_reaches_nvjpeg_in_both_graphs(images, monkeypatch):
    """dali.hw_decoder_load (and every other decoder option) reaches the GPU's
    `mixed` decoder, alike in the real graph and the decode-only one; the CPU
    decoder, which has no hardware decoder, gets none of nvJPEG's options. The
    GPU graphs are defined, not built: no GPU is needed."""
    from nvidia.dali import fn
    from nvidia.dali.pipeline import Pipeline

    from iecl.pipeline import dali as dali_module

    options = DaliOptions(hw_decoder_load=0.9)
    assert dali_module._decoder_options(options, gpu=True)["hw_decoder_load"] == 0.9
    assert "hw_decoder_load" not in dali_module._decoder_options(options, gpu=False)
    calls = []
    for name in ("image", "image_slice"):
        real = getattr(fn.decoders, name)

        def record(*args, _real=real, _name=name, **kwargs):
            calls.append((_name, kwargs))
            return _real(*args, **kwargs)

        monkeypatch.setattr(fn.decoders, name, record)
    loader = _dali(images)
    source = _source(loader)
    for decode in ("shared", "window"):
        seen = {}
        for graph in ("real", "decode-only"):
            calls.clear()
            with Pipeline(batch_size=4, num_threads=1, device_id=None):
                if graph == "real":
                    dali_module._build_graph(source, image_size=32, gpu=True, parallel=False, decode=decode,
                                             options=options)
                else:
                    dali_module._build_decode_only_graph(source, gpu=True, parallel=False, decode=decode,
                                                         options=options)
            assert len(calls) == (1 if decode == "shared" else 2)
            for op, kwargs in calls:
                assert op == ("image" if decode == "shared" else "image_slice")
                assert kwargs["device"] == "mixed" and kwargs["hw_decoder_load"] == 0.9
                assert kwargs["device_memory_padding"] == options.device_memory_padding
            seen[graph] = [kwargs for _, kwargs in calls]
        assert seen["real"] == seen["decode-only"]
    loader.close()


def _operators(outputs) -> list[tuple[str, str, tuple[str, ...], tuple[str, ...]]]:
    """(schema name, device, devices of its regular inputs, devices of its
    argument inputs) of every operator the outputs depend on, walking the
    defined (not built) graph."""
    seen, todo = {}, list(outputs)
    while todo:
        op = todo.pop().source
        if op is None or id(op) in seen:
            continue
        name = getattr(op._op, "schema_name", None) or type(op._op).__name__  # ExternalSource: a Python class
        devices = tuple(node.device for node in op.inputs)
        regular = op.spec.NumRegularInput()
        seen[id(op)] = (name, op._op.device, devices[:regular], devices[regular:])
        todo.extend(op.inputs)
    return list(seen.values())


@pytest.mark.parametrize("recipe", ["mocov2", "simclr", "byol", "decode-only"])
@pytest.mark.parametrize("decode", ["shared", "window"])
def test_the_gpu_graph_is_well_formed_without_a_gpu(images, recipe, decode):
    """The GPU graph (nvJPEG decoding, the views' work on the GPU) has never run
    here: defined (not built) on the CPU, every argument name is one the
    installed DALI's schema has (an unknown one raises at definition), every
    GPU and mixed operator has that backend in this DALI, no CPU operator reads
    a GPU input and every argument input (a per-sample parameter) is on the
    CPU (both of which DALI refuses at build), and the views leave on the GPU."""
    from nvidia.dali.ops import _registry
    from nvidia.dali.pipeline import Pipeline

    from iecl.pipeline import dali as dali_module

    only = recipe == "decode-only"  # DaliDecodeOnly's graph (bench loader --decode-only)
    loader = DaliLoader(images, BatchPlan(get_recipe("mocov2" if only else recipe), 4, 32, 0, 0, CPU), decode=decode)
    try:
        with Pipeline(batch_size=4, num_threads=1, device_id=None):
            if only:
                outputs = dali_module._build_decode_only_graph(_source(loader), gpu=True, parallel=False,
                                                               decode=decode, options=DaliOptions())
            else:
                outputs = dali_module._build_graph(_source(loader), image_size=32, gpu=True, parallel=False,
                                                   decode=decode, options=DaliOptions())
    finally:
        loader.close()
    views = outputs[:-2]  # then label and the skipped count
    assert {view.device for view in views} == {"gpu"} and len(views) == (1 if only and decode == "shared" else 2)
    operators = _operators(outputs)
    backends = {"gpu": _registry.gpu_ops(), "mixed": _registry.mixed_ops(), "cpu": _registry.cpu_ops()}
    assert {device for _, device, _, _ in operators} == {"cpu", "mixed", "gpu"}
    for name, device, inputs, arguments in operators:
        assert name in backends[device], (name, device)
        assert device != "cpu" or "gpu" not in inputs, (name, inputs)
        assert set(arguments) <= {"cpu"}, (name, arguments)
    assert only or any(arguments for *_, arguments in operators)  # the views' parameters: argument inputs
    decoders = {name for name, device, _, _ in operators if device == "mixed"}
    assert decoders == {"decoders__Image" if decode == "shared" else "decoders__ImageSlice"}
