"""The training loss computed in checkpointed chunks equals plain cross-entropy, in value and gradients."""

import torch
import torch.nn.functional as F

from moetrain.config import ModelConfig
from moetrain.models.decoder import IGNORE_INDEX, MoEForCausalLM, chunked_lm_loss


def test_chunked_loss_equals_cross_entropy_with_ignored_labels():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (37,))
    labels[[0, 5, 36]] = IGNORE_INDEX
    ref = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=IGNORE_INDEX)
    ref_grads = torch.autograd.grad(ref, [hidden, weight])
    got = chunked_lm_loss(hidden, weight, labels, chunk_tokens=8)  # 5 chunks, the last one short
    got_grads = torch.autograd.grad(got, [hidden, weight])
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)  # fp32 sums in another order
    for g, r in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6)


def test_model_loss_only_path_matches_logits_path():
    torch.manual_seed(0)
    model = MoEForCausalLM(ModelConfig.from_preset("tiny-deepseek-moe"))
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    labels = ids.clone()
    labels[1, :4] = IGNORE_INDEX
    full = model(ids, labels=labels)
    full.loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    lean = model(ids, labels=labels, return_logits=False)
    assert lean.logits is None
    lean.loss.backward()
    torch.testing.assert_close(lean.loss, full.loss, rtol=0, atol=1e-6)
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, ref[name], rtol=0, atol=1e-6, msg=name)
