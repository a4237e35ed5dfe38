"""lmforge.optim: each optimizer's update checked against its formula on numbers you can follow,
the parameter grouping and Muon's routing, checkpoint round trips, and a learning test."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import transformers
from lion_pytorch import Lion
from torch import nn

from lmforge.config.train import TrainConfig
from lmforge.optim import TRAINER_BUILT, MuonWithAdamW, SophiaG, build_optimizer, estimate_hessian
from lmforge.optim.muon import split_muon_params


class Toy(nn.Module):
    """One trainable matrix `w` and, optionally, a 1-D `b`."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None = None) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.b = None if b is None else nn.Parameter(b.clone())


def train_config(optimizer: str, lr: float = 0.1, weight_decay: float = 0.0, **args: object) -> TrainConfig:
    return TrainConfig(optimizer=optimizer, lr=lr, weight_decay=weight_decay, optimizer_args=args)


def tiny_llama(tie: bool = False, seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    return transformers.LlamaForCausalLM(config)


def repeating_batch() -> dict[str, torch.Tensor]:
    """4 rows of one 8-token cycle, each rotated: learnable from context alone."""
    cycle = torch.tensor([3, 17, 42, 8, 25, 60, 11, 33])
    ids = torch.stack([cycle.roll(k).repeat(3) for k in range(4)])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


# ---------------------------------------------------------------- groups, Trainer-built, config


@pytest.mark.parametrize("name", TRAINER_BUILT)
def test_trainer_built_optimizers_return_none(name):
    model = Toy(torch.ones(2, 3))
    assert build_optimizer(train_config(name), model) is None


@pytest.mark.parametrize("name", ["adafactor", "lion", "sophia", "sgd"])
def test_groups_decay_matrices_only_at_train_lr(name):
    model = Toy(torch.ones(2, 3), torch.ones(3))
    frozen = nn.Parameter(torch.ones(4, 4), requires_grad=False)
    model.frozen = frozen
    optimizer = build_optimizer(train_config(name, lr=0.01, weight_decay=0.3), model)
    groups = [(g["params"], g["weight_decay"], g["lr"]) for g in optimizer.param_groups]
    assert groups == [([model.w], 0.3, 0.01), ([model.b], 0.0, 0.01)]


def test_adafactor_gets_its_options():
    model = Toy(torch.ones(2, 3), torch.ones(3))
    train = train_config(
        "adafactor", lr=0.01, weight_decay=0.1, beta2_decay=-0.5, eps1=1e-20, eps2=1e-2, d=2.0
    )
    optimizer = build_optimizer(train, model)
    assert type(optimizer) is torch.optim.Adafactor
    group = optimizer.param_groups[0]
    assert (group["beta2_decay"], group["eps"], group["d"]) == (-0.5, (1e-20, 1e-2), 2.0)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]


def test_optimizer_args_are_checked_against_the_chosen_optimizer():
    with pytest.raises(ValueError, match=r"optimizer_args\.d: .*greater than or equal to 1"):
        train_config("adafactor", d=0.5)  # torch's Adafactor refuses d < 1
    with pytest.raises(ValueError, match=r"optimizer_args\.momentum is not an option of optimizer lion"):
        train_config("lion", momentum=0.9)
    with pytest.raises(ValueError, match=r"did you mean `betas`"):
        train_config("adamw", beta=[0.9, 0.95])
    with pytest.raises(ValueError, match=r"betas \[0.9, 1.5\] must each be in \[0, 1\)"):
        train_config("lion", betas=[0.9, 1.5])


def test_sgd_gets_its_options():
    model = Toy(torch.ones(2, 3), torch.ones(3))
    optimizer = build_optimizer(train_config("sgd", weight_decay=0.1, momentum=0.9, nesterov=True), model)
    assert type(optimizer) is torch.optim.SGD
    assert all(g["momentum"] == 0.9 and g["nesterov"] for g in optimizer.param_groups)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]


@pytest.mark.parametrize("name", ["lion", "muon"])
def test_no_trainable_parameters_is_a_clear_error(name):
    model = Toy(torch.ones(2, 3))
    model.w.requires_grad_(False)
    with pytest.raises(ValueError, match=f"optimizer {name}: the model has no trainable parameters"):
        build_optimizer(train_config(name), model)


# ---------------------------------------------------------------- Lion


def test_lion_two_steps_match_the_formula():
    p0 = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    grads = [
        torch.tensor([[0.2, -0.1, 0.4], [-0.3, 0.5, 0.1]]),
        torch.tensor([[-0.05, 0.3, 0.1], [0.2, -0.4, -0.6]]),
    ]
    lr, wd, (b1, b2) = 0.1, 0.5, (0.9, 0.5)
    model = Toy(p0)
    optimizer = build_optimizer(train_config("lion", lr=lr, weight_decay=wd, betas=[b1, b2]), model)
    assert isinstance(optimizer, Lion)

    p, m = p0.clone(), torch.zeros_like(p0)
    for g in grads:
        model.w.grad = g.clone()
        optimizer.step()
        c = b1 * m + (1 - b1) * g
        p = p * (1 - lr * wd) - lr * torch.sign(c)
        m = b2 * m + (1 - b2) * g
        torch.testing.assert_close(model.w.detach(), p)
    # The momentum flips signs of step 2's update against its gradient ([0, 0] and [1, 0]), so an
    # update that ignored it would have failed above.
    assert not torch.equal(torch.sign(b1 * (1 - b2) * grads[0] + (1 - b1) * grads[1]), torch.sign(grads[1]))


# ---------------------------------------------------------------- SophiaG


def test_sophia_update_hessian_is_the_ema_of_tokens_times_grad_squared():
    model = Toy(torch.zeros(2, 3))
    optimizer = SophiaG(model.parameters(), betas=(0.9, 0.75))
    g1, g2 = (
        torch.tensor([[1.0, 2.0, 0.0], [0.5, 3.0, 1.0]]),
        torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]]),
    )
    model.w.grad = g1
    optimizer.update_hessian(tokens=4)
    torch.testing.assert_close(optimizer.state[model.w]["hessian"], 0.25 * 4 * g1**2)
    model.w.grad = g2
    optimizer.update_hessian(tokens=2)
    torch.testing.assert_close(
        optimizer.state[model.w]["hessian"], 0.75 * (0.25 * 4 * g1**2) + 0.25 * 2 * g2**2
    )
    # Estimating is not an optimizer step.
    assert optimizer.state[model.w]["step"] == 0


def test_sophia_two_steps_match_the_formula_with_clipping_and_decay():
    lr, wd, rho, (b1, b2), eps = 0.1, 0.2, 0.5, (0.5, 0.5), 1e-15
    model = Toy(torch.ones(2, 3))
    optimizer = build_optimizer(
        train_config("sophia", lr=lr, weight_decay=wd, betas=[b1, b2], rho=rho, eps=eps), model
    )
    assert isinstance(optimizer, SophiaG)
    # h = (1 - b2) * 4 * g_h^2 = [[2, 8, 0], [0.5, 18, 2]], so rho * h = [[1, 4, 0], [0.25, 9, 1]].
    model.w.grad = torch.tensor([[1.0, 2.0, 0.0], [0.5, 3.0, 1.0]])
    optimizer.update_hessian(tokens=4)

    g1 = torch.tensor([[1.0, -2.0, 0.5], [-1.0, 4.0, 3.0]])
    model.w.grad = g1.clone()
    optimizer.step()
    # m = 0.5 * g1 = [[0.5, -1, 0.25], [-0.5, 2, 1.5]]; |m| / max(rho h, eps) =
    # [[0.5, 0.25, huge -> 1], [2 -> 1, 2/9, 1.5 -> 1]]; p = 1 * (1 - 0.02) - 0.1 * sign(m) * ratio.
    expected = torch.tensor(
        [[0.98 - 0.05, 0.98 + 0.025, 0.98 - 0.1], [0.98 + 0.1, 0.98 - 0.1 * 2 / 9, 0.98 - 0.1]]
    )
    torch.testing.assert_close(model.w.detach(), expected)

    g2 = torch.tensor([[-3.0, -2.0, -1.0], [0.5, -4.0, 0.2]])
    model.w.grad = g2.clone()
    optimizer.step()
    m = b1 * (0.5 * g1) + (1 - b1) * g2
    rho_h = torch.tensor([[1.0, 4.0, 0.0], [0.25, 9.0, 1.0]])
    ratio = (m.abs() / rho_h.clamp(min=eps)).clamp(max=1)
    assert ratio.eq(1).any() and ratio.lt(1).any()  # some coordinates clip, some do not
    torch.testing.assert_close(model.w.detach(), expected * (1 - lr * wd) - lr * m.sign() * ratio)
    assert optimizer.state[model.w]["step"] == 2


def test_sophia_hessian_due_every_n_steps():
    optimizer = build_optimizer(train_config("sophia", hessian_every=3), Toy(torch.ones(2, 3)))
    assert optimizer.hessian_every == 3
    assert [step for step in range(8) if optimizer.hessian_due(step)] == [0, 3, 6]
    assert copy.deepcopy(optimizer).hessian_every == 3


class RecordingSophia(SophiaG):
    def update_hessian(self, tokens: int) -> None:
        self.tokens = tokens
        super().update_hessian(tokens)


def test_estimate_hessian_counts_shifted_labels_and_clears_grads():
    model = tiny_llama()
    batch = repeating_batch()
    batch["labels"][0, :5] = -100  # shifted labels[:, 1:] lose 4 of row 0
    batch["labels"][1, -1] = -100
    optimizer = RecordingSophia(model.parameters())
    model(**batch).loss.backward()  # stale grads the estimate must not mix in
    estimate_hessian(model, batch, optimizer)
    assert optimizer.tokens == 4 * 23 - 4 - 1
    for name, param in model.named_parameters():
        assert param.grad is None, name
        hessian = optimizer.state[param]["hessian"]
        assert hessian.min() >= 0 and hessian.max() > 0, name


def test_estimate_hessian_ignores_masked_positions():
    model = tiny_llama()
    batch = repeating_batch()
    batch["labels"][:] = -100
    batch["labels"][:, 3] = batch["input_ids"][:, 3]  # predicted by the logits at position 2

    def hessians(inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        optimizer = SophiaG(model.parameters())
        torch.manual_seed(1)
        estimate_hessian(model, inputs, optimizer)
        return [optimizer.state[p]["hessian"] for p in model.parameters()]

    changed = {**batch, "input_ids": batch["input_ids"].clone()}
    changed["input_ids"][:, 3:] = 5  # positions whose logits predict only -100 labels
    for a, b in zip(hessians(batch), hessians(changed), strict=True):
        torch.testing.assert_close(a, b)
    changed["input_ids"][:, 2] = 5  # the one position that is predicting
    assert any(not torch.equal(a, b) for a, b in zip(hessians(batch), hessians(changed), strict=True))


def test_estimate_hessian_without_labels_leaves_the_hessian_alone():
    model = tiny_llama()
    batch = repeating_batch()
    batch["labels"][:] = -100
    optimizer = SophiaG(model.parameters())
    estimate_hessian(model, batch, optimizer)
    assert not optimizer.state
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------- Muon


def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Keller Jordan's quintic iteration as torch runs it: bf16, on the wide orientation.

    x <- a x + (b X + c X^2) x with X = x x^T. In bf16 the result depends on rounding order, so
    the two products are fused as addmm, as torch does.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16()
    tall = g.shape[0] > g.shape[1]
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if tall else x).float()


@pytest.mark.parametrize(
    ("adjust_lr_fn", "scale"), [("original", (4 / 3) ** 0.5), ("match_rms_adamw", 0.2 * 2)]
)
def test_muon_two_steps_match_newton_schulz_of_nesterov_momentum(adjust_lr_fn, scale):
    lr, wd, mu = 0.05, 0.1, 0.9
    p0 = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0], [2.0, 1.0, 1.0], [-1.0, 0.5, 2.0]])
    grads = [
        torch.tensor([[0.2, -0.1, 0.4], [-0.3, 0.5, 0.1], [0.0, 0.2, -0.2], [0.1, 0.1, 0.3]]),
        torch.tensor([[-0.5, 0.3, 0.1], [0.2, -0.4, -0.6], [0.3, 0.0, 0.1], [-0.2, 0.4, 0.0]]),
    ]
    model = Toy(p0)  # 4x3 weight named "w": a hidden matrix, so Muon's
    extra = {"adamw_lr": 1e-3} if adjust_lr_fn == "original" else {}  # no AdamW part here; required
    train = train_config("muon", lr=lr, weight_decay=wd, momentum=mu, adjust_lr_fn=adjust_lr_fn, **extra)
    optimizer = build_optimizer(train, model)
    assert optimizer.adamw is None and optimizer.muon.param_groups[0]["params"] == [model.w]

    p, buf = p0.clone(), torch.zeros_like(p0)
    for g in grads:
        model.w.grad = g.clone()
        optimizer.step()
        buf = mu * buf + (1 - mu) * g  # torch's Muon keeps an EMA of the gradient
        update = newton_schulz((1 - mu) * g + mu * buf)  # Nesterov: look one momentum step ahead
        p = p * (1 - lr * wd) - lr * scale * update  # decay at lr, update at the shape-adjusted lr
        torch.testing.assert_close(model.w.detach(), p)
    singular = torch.linalg.svdvals(update)
    assert singular.min() > 0.5 and singular.max() < 1.5  # roughly orthogonal, as Muon promises


class TinyLM(nn.Module):
    """Embedding -> LayerNorm -> Linear -> head, with transformers' embedding accessors."""

    def __init__(self, tie: bool) -> None:
        super().__init__()
        self.wte = nn.Embedding(16, 8)
        self.norm = nn.LayerNorm(8)
        self.hidden = nn.Linear(8, 8)
        self.mlp = nn.Linear(8, 8, bias=False)
        self.head = nn.Linear(8, 16, bias=False)
        if tie:
            self.head.weight = self.wte.weight

    def get_input_embeddings(self) -> nn.Module:
        return self.wte

    def get_output_embeddings(self) -> nn.Module:
        return self.head


@pytest.mark.parametrize("tie", [False, True])
def test_muon_routes_hidden_matrices_only(tie):
    muon, adamw = split_muon_params(TinyLM(tie))
    assert [name for name, _ in muon] == ["hidden.weight", "mlp.weight"]
    rest = ["wte.weight", "norm.weight", "norm.bias", "hidden.bias"] + ([] if tie else ["head.weight"])
    assert [name for name, _ in adamw] == rest


def test_muon_routes_by_name_without_embedding_accessors():
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = nn.Embedding(16, 8)
            self.proj = nn.Linear(8, 8)
            self.lm_head = nn.Linear(8, 16, bias=False)

    muon, adamw = split_muon_params(Plain())
    assert [name for name, _ in muon] == ["proj.weight"]
    assert [name for name, _ in adamw] == ["embed_tokens.weight", "proj.bias", "lm_head.weight"]


def test_muon_routes_a_peft_model_by_identity():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    )
    muon, adamw = split_muon_params(model)
    assert muon and all("lora_" in name for name, _ in muon)
    assert [name for name, _ in adamw] == ["base_model.model.lm_head.modules_to_save.default.weight"]


def test_muon_groups_share_dicts_and_lrs():
    model = tiny_llama()
    train = train_config("muon", lr=0.02, weight_decay=0.1, adamw_lr=0.003)
    optimizer = build_optimizer(train, model)
    assert isinstance(optimizer, MuonWithAdamW)
    inner = optimizer.muon.param_groups + optimizer.adamw.param_groups
    assert all(a is b for a, b in zip(optimizer.param_groups, inner, strict=True))
    assert [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [
        (0.02, 0.1),  # Muon: hidden matrices
        (0.003, 0.1),  # AdamW: embeddings and head
        (0.003, 0.0),  # AdamW: norms
    ]
    named = dict(model.named_parameters())
    assert optimizer.adamw.param_groups[0]["params"] == [
        named["model.embed_tokens.weight"],
        named["lm_head.weight"],
    ]


def lm_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> None:
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_muon_state_dict_resume_equals_uninterrupted_run():
    batch = repeating_batch()
    train = train_config("muon", lr=0.01, weight_decay=0.1)
    model = tiny_llama()
    optimizer = build_optimizer(train, model)
    for _ in range(2):
        lm_step(model, optimizer, batch)

    saved = io.BytesIO()
    torch.save(optimizer.state_dict(), saved)
    saved.seek(0)
    state = torch.load(saved, weights_only=True)
    resumed_model = copy.deepcopy(model)
    resumed = build_optimizer(train, resumed_model)
    resumed.load_state_dict(state)
    assert resumed.muon.state is resumed.state and resumed.adamw.param_groups[0] is resumed.param_groups[1]

    for _ in range(2):
        lm_step(model, optimizer, batch)
        lm_step(resumed_model, resumed, batch)
    for (name, a), b in zip(model.named_parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_muon_deepcopy_keeps_the_inner_optimizers_linked():
    optimizer = build_optimizer(train_config("muon"), tiny_llama())
    copied = copy.deepcopy(optimizer)
    assert copied.muon.param_groups[0] is copied.param_groups[0]
    assert copied.adamw.state is copied.state


@pytest.fixture
def accelerator():
    import accelerate
    from accelerate.state import AcceleratorState, GradientState

    yield accelerate.Accelerator(cpu=True)
    # accelerate's state is a process-wide singleton; reset it as accelerate's own test case does
    # (accelerate.test_utils.AccelerateTestCase.tearDown) so later tests start clean.
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_muon_under_accelerate(accelerator):
    model = tiny_llama()
    optimizer = build_optimizer(train_config("muon", lr=0.01), model)
    wrapped = accelerator.prepare(optimizer)
    before = [p.detach().clone() for p in model.parameters()]
    lm_step(model, wrapped, repeating_batch())
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())
    assert wrapped.param_groups[0] is optimizer.muon.param_groups[0]
    assert set(wrapped.state) == set(model.parameters())


@pytest.mark.parametrize("name", ["muon", "sophia"])
def test_transformers_scheduler_drives_every_group(name):
    optimizer = build_optimizer(train_config(name, lr=0.01), tiny_llama())
    scheduler = transformers.get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=10)
    inner = [optimizer] if name == "sophia" else [optimizer.muon, optimizer.adamw]
    assert all(g["lr"] == 0.0 for o in inner for g in o.param_groups)  # warmup starts at 0
    optimizer.step()
    scheduler.step()
    assert all(g["lr"] == pytest.approx(0.005) for o in inner for g in o.param_groups)


def test_muon_adamw_lr_is_scheduled_from_its_own_peak():
    optimizer = build_optimizer(train_config("muon", lr=0.02, adamw_lr=0.004), tiny_llama())
    scheduler = transformers.get_scheduler("linear", optimizer, num_warmup_steps=2, num_training_steps=10)
    optimizer.step()
    scheduler.step()
    assert optimizer.muon.param_groups[0]["lr"] == pytest.approx(0.01)
    assert [g["lr"] for g in optimizer.adamw.param_groups] == pytest.approx([0.002, 0.002])


# ---------------------------------------------------------------- learning


@pytest.mark.parametrize(
    ("name", "lr", "args"),
    [
        ("lion", 3e-3, {}),
        # rho 1 rather than 0.04: about half the coordinates then move by less than lr, so the
        # Hessian estimate shapes the run instead of nearly every coordinate clipping to sign(m).
        ("sophia", 3e-3, {"hessian_every": 1, "rho": 1.0}),
        ("muon", 2e-2, {}),
        ("adafactor", 3e-2, {}),
        ("sgd", 0.1, {"momentum": 0.9}),
    ],
)
def test_optimizer_lowers_a_tiny_lm_loss(name, lr, args):
    model = tiny_llama(seed=0)
    batch = repeating_batch()
    optimizer = build_optimizer(train_config(name, lr=lr, weight_decay=0.01, **args), model)
    with torch.no_grad():
        start = model(**batch).loss.item()
    for step in range(30):
        if isinstance(optimizer, SophiaG) and optimizer.hessian_due(step):
            estimate_hessian(model, batch, optimizer)
        lm_step(model, optimizer, batch)
    with torch.no_grad():
        end = model(**batch).loss.item()
    assert end < 0.5 * start, (start, end)
