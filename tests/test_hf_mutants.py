"""patch_transformers on configs the other tests leave at transformers' defaults: the erf GELU
(GPT-2's activation_function="gelu") and a LayerNorm eps other than 1e-5, each of which a patch
that ignored it would get wrong only off the defaults."""
import pytest
import torch

import gptfast

from test_hf_patch import DEV, Calls, hf_gpt2

pytest.importorskip("transformers")


@pytest.mark.parametrize("activation", ["gelu", "gelu_new", "gelu_pytorch_tanh"])
def test_mlp_gelu_forms_and_layer_norm_eps_equal_transformers(monkeypatch, activation):
    model = hf_gpt2(seed=21, activation_function=activation, layer_norm_epsilon=0.03, n_embd=48, n_head=3)
    ids = torch.randint(0, 211, (2, 13), device=DEV)
    with torch.no_grad():
        want = model(ids).logits
    calls = Calls(monkeypatch)
    gptfast.patch_transformers(model)
    with torch.no_grad():
        got = model(ids).logits
    assert calls.n["linear_bias_gelu"] == 2 and calls.n["layer_norm"] == 5, calls.n
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_mask_changed_in_place_is_read_again():
    """The window is remembered for the mask object the layers share, and read again once that
    object is written to (its version counter), never a stale window for new padding."""
    from gptfast.hf_patch import _mask_window, _read_window
    mask = torch.ones(5, 5, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
    key = ("gpt2", 2, 5, 5)

    def read():
        return _read_window(mask, 2, 5, 5)
    assert _mask_window(mask, key, read, "refused") == ((None, None, 5), None)
    mask[1, ..., 3:] = False  # row 1 right-padded after 3 keys
    (start, end, used), reason = _mask_window(mask, key, read, "refused")
    assert (start.tolist(), end.tolist(), used, reason) == ([0, 0], [5, 3], 5, None)


def test_fused_loss_keeps_a_custom_ignore_index():
    """ignore_index passed to the model (transformers hands it to its loss) skips those labels in
    the fused loss too: here -1 marks the pads, and -100 is an ordinary (out of range) label nowhere."""
    import copy
    model = hf_gpt2(seed=22).train()
    patched = gptfast.patch_transformers(copy.deepcopy(model))
    ids = torch.randint(0, 211, (2, 11), device=DEV)
    labels = ids.clone()
    labels[0, 6:] = -1
    want = model(ids, labels=labels, ignore_index=-1).loss
    got = patched(ids, labels=labels, ignore_index=-1).loss
    assert got.isfinite()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
