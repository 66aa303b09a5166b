import jax.numpy as jnp
import numpy as np

from st2v_jax.diffusion.guidance import Guidance, combine_guidance, guidance_contexts, repeat_for_branches


def _tokens(value, n):
    return jnp.full((2, n, 3), value, jnp.float32)


def test_release_form_is_single_weight_cfg():
    g = Guidance(text_scale=7.5)
    ctx = guidance_contexts(g, _tokens(1.0, 4), _tokens(-1.0, 4), _tokens(2.0, 2), _tokens(-2.0, 2))
    assert ctx.shape == (4, 6, 3)
    np.testing.assert_array_equal(ctx[:2, :4], -1.0)  # negative prompt first
    np.testing.assert_array_equal(ctx[:2, 4:], -2.0)  # grey anchor in the unconditional branch
    np.testing.assert_array_equal(ctx[2:, :4], 1.0)
    np.testing.assert_array_equal(ctx[2:, 4:], 2.0)
    eps = jnp.concatenate([jnp.full((2, 5), 1.0), jnp.full((2, 5), 3.0)])
    np.testing.assert_allclose(combine_guidance(g, eps), 1.0 + 7.5 * 2.0)
    assert repeat_for_branches(g, jnp.ones((2, 5))).shape == (4, 5)


def test_paper_form_guides_text_and_anchor_separately():
    g = Guidance(text_scale=7.5, anchor_scale=2.0)
    ctx = guidance_contexts(g, _tokens(1.0, 4), _tokens(-1.0, 4), _tokens(2.0, 2), _tokens(-2.0, 2))
    assert ctx.shape == (6, 6, 3)
    np.testing.assert_array_equal(ctx[2:4, :4], -1.0)  # anchor-only branch: negative prompt ...
    np.testing.assert_array_equal(ctx[2:4, 4:], 2.0)  # ... with the real anchor
    eps = jnp.concatenate([jnp.full((2, 5), 1.0), jnp.full((2, 5), 2.0), jnp.full((2, 5), 5.0)])
    np.testing.assert_allclose(combine_guidance(g, eps), 1.0 + 2.0 * 1.0 + 7.5 * 3.0)
    # With both weights 1 the guided prediction is the fully conditional one (exactly 1 runs
    # that branch alone: test_weights_of_one_run_only_the_conditional_branch).
    np.testing.assert_allclose(combine_guidance(Guidance(1.0, 1.0 + 1e-9), eps), 5.0, rtol=1e-6)


def test_weights_of_one_run_only_the_conditional_branch():
    for g in (Guidance(text_scale=1.0), Guidance(text_scale=1.0, anchor_scale=1.0)):
        ctx = guidance_contexts(g, _tokens(1.0, 4), _tokens(-1.0, 4), _tokens(2.0, 2), _tokens(-2.0, 2))
        assert g.num_branches == 1 and ctx.shape == (2, 6, 3)
        np.testing.assert_array_equal(ctx[:, :4], 1.0)  # the prompt ...
        np.testing.assert_array_equal(ctx[:, 4:], 2.0)  # ... with the real anchor
        eps = jnp.full((2, 5), 3.0)
        np.testing.assert_array_equal(combine_guidance(g, eps), eps)
        assert repeat_for_branches(g, jnp.ones((2, 5))).shape == (2, 5)
    # The full computation at weight 1 is the conditional branch: the same result either way.
    eps = jnp.concatenate([jnp.full((2, 5), 1.0), jnp.full((2, 5), 3.0)])
    np.testing.assert_allclose(combine_guidance(Guidance(text_scale=1.0 + 1e-9), eps), 3.0)
    assert Guidance(text_scale=1.5).num_branches == 2 and Guidance(text_scale=1.0, anchor_scale=2.0).num_branches == 3
