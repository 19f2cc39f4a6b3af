"""Causal-LM students (pkd_cache/student/causal_lm.py): layer copy, one-line errors, TokenKD's causal alignment."""
from __future__ import annotations

import math

import pytest
import torch

from pkd_cache.errors import PkdCacheError
from pkd_cache.student.causal_lm import HiddenStateMSE, TokenKD, causal_lm_student, check_same_vocab
from pkd_cache.student.sparse_kd import sample_targets, topk_targets
from pkd_cache.testing import make_bert

V = 37


def _gpt2(folder, layers=3):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=32, n_embd=16, n_layer=layers, n_head=2,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).save_pretrained(folder)
    return str(folder)


def _llama(folder, layers=3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                 tie_word_embeddings=False)).save_pretrained(folder)
    return str(folder)


def _qwen2(folder, layers=3):  # its config keeps one `layer_types` entry per layer
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(2)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                                 num_attention_heads=2, num_key_value_heads=1,
                                 max_position_embeddings=32)).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("make,blocks,count", [(_gpt2, "transformer.h", "n_layer"),
                                               (_llama, "model.layers", "num_hidden_layers"),
                                               (_qwen2, "model.layers", "num_hidden_layers")])
def test_student_copies_the_first_k_blocks_and_round_trips(tmp_path, make, blocks, count):
    from transformers import AutoModelForCausalLM

    path = make(tmp_path / "teacher")
    teacher = AutoModelForCausalLM.from_pretrained(path)
    student = causal_lm_student(path, layers=2)
    assert len(student.get_submodule(blocks)) == 2 and getattr(student.config, count) == 2
    t_state = teacher.state_dict()
    for name, value in student.state_dict().items():  # every student weight is the teacher's, block i = block i
        assert torch.equal(value, t_state[name]), name
    dropped = [n for n in t_state if n.startswith(f"{blocks}.2.")]
    assert dropped and not any(n in student.state_dict() for n in dropped)
    student.save_pretrained(tmp_path / "student")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    x = torch.randint(0, V, (2, 7))
    student.eval()
    assert len(again.get_submodule(blocks)) == 2 and len(getattr(again.config, "layer_types", None) or "..") == 2
    assert torch.equal(again(input_ids=x).logits, student(input_ids=x).logits)
    assert len(causal_lm_student(path).get_submodule(blocks)) == 3  # layers=None keeps them all


def test_one_line_errors(tmp_path):
    path = _gpt2(tmp_path / "gpt2")
    for layers in (0, 4):
        with pytest.raises(PkdCacheError, match=r"--student-layers .*has 3 layers") as e:
            causal_lm_student(path, layers)
        assert "\n" not in str(e.value)
    bert = make_bert(tmp_path / "bert", layers=2, head=False)
    with pytest.raises(PkdCacheError, match="not a causal LM") as e:
        causal_lm_student(str(bert), 1)
    assert "\n" not in str(e.value)
    with pytest.raises(PkdCacheError, match="model path .*nothing does not exist") as e:  # as for every model
        causal_lm_student(str(tmp_path / "nothing"), 1)
    assert "\n" not in str(e.value)
    student = causal_lm_student(path, 1)
    check_same_vocab(student, V, "the store")
    with pytest.raises(PkdCacheError, match=f"has {V} tokens but the store has {V + 1}") as e:
        check_same_vocab(student, V + 1, "the store")
    assert "\n" not in str(e.value)


def _hand_made():
    """One row, tokens [0, 1, 2], V = 3: the student's probabilities at t = 0 and t = 1 are known; its logits at
    the last position are NaN (they must not count)."""
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]])
    logits = torch.cat([probs.log(), torch.full((1, 3), float("nan"))]).unsqueeze(0).requires_grad_()
    return logits, torch.tensor([[0, 1, 2]]), torch.ones(1, 3, dtype=torch.long)


def test_token_kd_hand_made_alignment():
    logits, ids, mask = _hand_made()
    ce, parts = TokenKD("sample", alpha=0.0)(logits, ids, mask)
    # position 0 predicts token 1 (p = 0.25), position 1 token 2 (p = 0.7); unshifted would give 0.5 and 0.2
    assert ce.item() == pytest.approx((math.log(4) - math.log(0.7)) / 2, abs=1e-6) and parts["tokens"] == 2
    # sample:1 targets stored per position: t = 0 drew id 2 (student p 0.25), t = 1 drew id 0 (0.1), t = 2 junk
    targets = (torch.tensor([[[2], [0], [1]]]), torch.tensor([[[1], [1], [1]]]))
    loss, parts = TokenKD("sample", alpha=0.5)(logits, ids, mask, targets)
    assert parts["kd"].item() == pytest.approx((math.log(4) + math.log(10)) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(ce.item() + 0.5 * parts["kd"].item(), abs=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and torch.equal(logits.grad[0, 2], torch.zeros(3))


def test_last_position_and_padding_contribute_nothing():
    torch.manual_seed(0)
    ids = torch.randint(0, V, (2, 6))
    mask = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]])
    logits = torch.randn(2, 6, V)
    teacher = torch.randn(2, 6, V)
    kinds = {"full": lambda t: t, "topk": lambda t: topk_targets(t.reshape(-1, V), 5),
             "sample": lambda t: sample_targets(t.reshape(-1, V), 8, torch.Generator().manual_seed(0))}
    for kind, make in kinds.items():
        raw = make(teacher)
        targets = raw if kind == "full" else tuple(x.reshape(2, 6, -1) for x in raw)
        loss_fn = TokenKD(kind, alpha=0.7)
        z = logits.clone().requires_grad_()
        loss, parts = loss_fn(z, ids, mask, targets)
        loss.backward()
        assert parts["tokens"] == 5 + 3
        dead = torch.tensor([[0, 0, 0, 0, 0, 1], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)  # last real + padding
        assert torch.equal(z.grad[dead], torch.zeros(int(dead.sum()), V))
        garbage = logits.clone()
        garbage[dead] = float("nan")
        ids2 = ids.masked_fill(mask == 0, 0)
        t2 = teacher.masked_fill(dead.unsqueeze(-1), 5.0) if kind == "full" else tuple(
            x.masked_fill(dead.unsqueeze(-1), 1) if x.dtype == torch.long else x for x in targets)
        assert loss_fn(garbage, ids2, mask, t2)[0].item() == pytest.approx(loss.item(), abs=1e-6), kind


def test_alpha_zero_is_hf_labels_loss(tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(_gpt2(tmp_path / "gpt2")).eval()
    torch.manual_seed(1)
    ids = torch.randint(0, V, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:], mask[2, 3:] = 0, 0
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    loss, _ = TokenKD("full", alpha=0.0)(out.logits, ids, mask, None)
    assert loss.item() == pytest.approx(out.loss.item(), abs=1e-5)


@pytest.mark.parametrize("objective", ["ce", "kl"])
def test_full_targets_equal_to_own_logits_give_zero_kd_gradient(objective):
    torch.manual_seed(2)
    logits = (3 * torch.randn(2, 5, V)).requires_grad_()
    ids, mask = torch.randint(0, V, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    loss_fn = TokenKD("full", alpha=1.0, temperature=2.0, objective=objective)
    _, parts = loss_fn(logits, ids, mask, logits.detach())
    kd = loss_fn.kd(logits[:, :-1], logits.detach()[:, :-1])
    (grad,) = torch.autograd.grad(kd, logits)
    assert grad.abs().max().item() < 1e-6  # T (s - p) with p = s: zero for both objectives (p is detached)
    lp = torch.log_softmax(logits.detach()[:, :-1] / 2.0, -1)
    entropy = -(lp.exp() * lp).sum(-1).mean() * 4.0  # T² H(s)
    expected = 0.0 if objective == "kl" else entropy.item()
    assert parts["kd"].item() == pytest.approx(expected, abs=1e-5)


def test_hidden_state_mse_projection_and_mask():
    torch.manual_seed(3)
    student = [torch.randn(2, 4, 8) for _ in range(3)]
    teacher = [torch.randn(2, 4, 12) for _ in range(5)]
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    loss_fn = HiddenStateMSE({1: 2, 2: 4}, 8, 12)
    assert isinstance(loss_fn.proj["1"], torch.nn.Linear) and len(list(loss_fn.parameters())) == 4
    loss = loss_fn(student, teacher, mask)
    teacher[4][1, 2:] = 1e6  # padding: no effect
    assert loss_fn(student, teacher, mask).item() == pytest.approx(loss.item())
    same = HiddenStateMSE({1: 1}, 8, 8)
    assert same([None, student[1]], [None, student[1]], mask).item() == 0.0


@pytest.mark.parametrize("kind", ["sample", "topk"])
def test_token_kd_at_t1_shares_one_log_softmax_and_equals_the_two_losses(kind):
    """At T = 1 TokenKD scores CE and KD on one log-softmax: the same value and gradient as CE plus the KD module
    applied on its own (padding and each row's last position masked in both)."""
    from pkd_cache.student.sparse_kd import SampledKDLoss, TopKKDLoss, sample_targets, topk_targets

    torch.manual_seed(0)
    b, s, v = 3, 7, 11
    z = torch.randn(b, s, v, requires_grad=True)
    ids = torch.randint(0, v, (b, s))
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, 5:] = 0
    teacher = torch.randn(b * s, v)
    made = sample_targets(teacher, 8, torch.Generator().manual_seed(1)) if kind == "sample" else topk_targets(teacher, 3)
    targets = tuple(t.reshape(b, s, -1) for t in made)
    if kind == "sample":
        targets[1][0, 2] = 0  # a position without draws: left out of KD's mean, still in CE's
    loss, parts = TokenKD(kind, alpha=0.7)(z, ids, mask, targets)
    (grad,) = torch.autograd.grad(loss, z)
    valid = mask[:, :-1].bool() & mask[:, 1:].bool()
    ce = torch.nn.functional.cross_entropy(z[:, :-1][valid], ids[:, 1:][valid])
    module = SampledKDLoss() if kind == "sample" else TopKKDLoss()
    kd = module(z[:, :-1], *(t[:, :-1] for t in targets), mask=valid)
    if kind == "sample":  # and by hand, in plain autograd (both modules above gather through gathered_nll)
        tid, cnt = (t[:, :-1][valid] for t in targets)
        q = cnt / cnt.sum(-1, keepdim=True).clamp_min(1)
        lp = torch.log_softmax(z[:, :-1][valid], -1)
        assert torch.allclose(kd, -(q * lp.gather(-1, tid)).sum() / (cnt.sum(-1) > 0).sum(), atol=1e-6)
    (want,) = torch.autograd.grad(ce + 0.7 * kd, z, retain_graph=True)
    if kind == "sample":
        (by_hand,) = torch.autograd.grad(ce - 0.7 * (q * lp.gather(-1, tid)).sum() / (cnt.sum(-1) > 0).sum(), z)
        assert torch.allclose(want, by_hand, atol=1e-6)
    assert torch.allclose(loss, ce + 0.7 * kd, atol=1e-6) and torch.allclose(parts["kd"], kd, atol=1e-6)
    assert torch.allclose(grad, want, atol=1e-6) and grad.abs().sum() > 0
