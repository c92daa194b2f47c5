"""torch.compile of CLEAR-patched transformers with the "tiled" backend: where graphs break, when they recompile.

Graph capture only (backend="eager"): it is dynamo that decides graph breaks and recompilation, and inductor
would cost minutes on a CPU.
"""

import torch
import torch._dynamo
from dit_models import TINY_SD35_CONFIG, sd3_inputs, tiny_sd3_transformer
from flux_models import flux_inputs, run, tiny_flux_transformer
from torch._dynamo.utils import counters

import clear_dit


def test_sd3_compiles_without_graph_breaks_and_recompiles_per_resolution(tmp_path):
    model = tiny_sd3_transformer(tmp_path / "sd35", TINY_SD35_CONFIG)
    clear_dit.patch(model, window_size=2, down_factor=2, backend="tiled")
    compiled = torch.compile(model, backend="eager")
    torch._dynamo.reset()
    counters.clear()
    a, b = sd3_inputs((4, 6)), sd3_inputs((8, 4))
    torch.testing.assert_close(run(compiled, a), run(model, a), atol=1e-5, rtol=1e-5)
    run(compiled, a)
    assert not counters["graph_break"]  # the grid comes from the latent shape: nothing to break on
    assert counters["stats"]["unique_graphs"] == 1  # same resolution: the graph is reused
    torch.testing.assert_close(run(compiled, b), run(model, b), atol=1e-5, rtol=1e-5)
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 2  # a new resolution compiles a new graph


def test_flux_breaks_only_where_the_grid_is_read_from_img_ids(tmp_path):
    model = tiny_flux_transformer(tmp_path / "flux")
    clear_dit.patch(model, window_size=2, backend="tiled")
    inputs = flux_inputs((4, 6))
    expected = run(model, inputs)
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(**inputs)
    # whole-model compile: reading img_ids values is the one break, before the blocks; none in attention
    assert explained.graph_break_count == 1
    assert explained.break_reasons[0].user_stack[-1].name == "image_grids_from_ids"

    # regional compilation (diffusers' compile_repeated_blocks) leaves the hook outside: no break at all
    torch._dynamo.reset()
    counters.clear()
    model.compile_repeated_blocks(backend="eager")
    torch.testing.assert_close(run(model, inputs), expected, atol=1e-5, rtol=1e-5)
    assert not counters["graph_break"]
