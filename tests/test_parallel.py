"""Mesh specs and logical-axis layouts, computed from shapes alone (no devices needed)."""
import pytest
from jax.sharding import PartitionSpec as P

from st2v_jax import parallel
from st2v_jax.parallel import DEFAULT_RULES, MeshSpecError, bytes_per_device, parse_mesh_spec, partition_spec


def test_mesh_specs_fill_the_devices():
    assert parse_mesh_spec("data=-1,fsdp=4,tensor=1", 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert parse_mesh_spec("fsdp=8", 8) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert parse_mesh_spec("fsdp=2", 8) == {"data": 4, "fsdp": 2, "tensor": 1}  # unnamed devices: data
    assert parse_mesh_spec("data=2,fsdp=-1,tensor=2", 16) == {"data": 2, "fsdp": 4, "tensor": 2}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("data=-1,fsdp=3", "needs a multiple of 3 devices; there are 8"),
        ("data=2,fsdp=2,tensor=1", "covers 4 devices; there are 8"),
        ("data=-1,fsdp=-1", "only one axis can be -1"),
        ("model=8", "AXIS=SIZE with AXIS one of"),
        ("fsdp=four", "should be an integer"),
        ("fsdp=0", "sizes are positive"),
        ("fsdp=2,fsdp=4", "names 'fsdp' twice"),
    ],
)
def test_bad_mesh_specs_are_named(spec, message):
    with pytest.raises(MeshSpecError, match=message):
        parse_mesh_spec(spec, 8)


def test_dimensions_the_mesh_does_not_divide_stay_whole():
    sizes = {"data": 2, "fsdp": 4, "tensor": 2}
    names = ("conv_taps", "conv_taps", "channels_in", "channels_out")
    assert partition_spec(names, (3, 3, 320, 640), sizes, DEFAULT_RULES) == P(None, None, "fsdp", "tensor")
    assert partition_spec(names, (3, 3, 3, 128), sizes, DEFAULT_RULES) == P(None, None, None, "tensor")  # VAE conv_in
    assert partition_spec(("channels",), (320,), sizes, DEFAULT_RULES) == P(None)
    assert parallel.batch_spec(8, sizes) == P(("data", "fsdp"))
    assert parallel.batch_spec(2, sizes) == P("data")
    assert parallel.batch_spec(1, sizes) == P(None)


def test_bytes_per_device_count_the_largest_shard():
    import jax
    import numpy as np

    shapes = [jax.ShapeDtypeStruct((3, 3, 320, 640), np.float32), jax.ShapeDtypeStruct((10,), np.float32)]
    specs = [P(None, None, "fsdp", "tensor"), P("fsdp")]
    assert bytes_per_device(shapes, specs, {"data": 1, "fsdp": 8, "tensor": 2}) == 9 * 40 * 320 * 4 + 2 * 4


def test_the_memory_report_of_the_full_model_runs(capsys):
    assert parallel.main(["--config", "configs/streaming_t2v_components.py", "--mesh", "fsdp=8"]) == 0
    table = capsys.readouterr().out
    assert "| streaming | 2,124.8 M |" in table and "| **all** | 4,592.1 M | 17,517.5 MiB | 2,206.2 MiB | 1/7.94 |" in table


def test_sample_refuses_a_mesh_the_devices_cannot_hold_before_loading(tiny_model_dir, tmp_path, monkeypatch):
    from st2v_jax import sample
    from st2v_jax.generation.pipeline import StreamingT2VPipeline

    monkeypatch.setattr(StreamingT2VPipeline, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(sample.UsageError, match=r"--mesh: .* needs a multiple of 4 devices; there are 1"):
        sample.run(["--prompt", "a red circle", "--mesh", "fsdp=4", "--model-dir", str(tiny_model_dir), "--out", str(tmp_path / "v.mp4")])
