"""What makes training fast on a GPU without changing what it computes: the learning rate scaled with the batch, the
finite-loss check that does not sync the device every step, and the compiled training loss."""

import math
from types import SimpleNamespace

import pytest
import torch

from test_models import attention_module

from captioner.modules import PooledCaptioner, warmup_cosine_schedule

VOCAB = {"itos": ["<pad>", "<sos>", "<eos>", "<unk>"] + [f"w{i}" for i in range(10)]}


def lstm_module(**kw) -> PooledCaptioner:
    torch.manual_seed(0)
    decoder = {"_target_": "captioner.decoders.LSTMInitDecoder", "_partial_": True, "embed_dim": 8, "hidden_dim": 16,
               "dropout": 0.0}
    return PooledCaptioner(vocab=VOCAB, decoder=decoder, encoder={"name": "efficientnet_lite0"}, feature_dim=8, **kw)


def attach(module, batch_size=64, world_size=1, accumulate=1, global_step=0):
    """A stand-in for the trainer the module reads: its DataModule's batch, ranks, accumulation and step."""
    module._trainer = SimpleNamespace(datamodule=SimpleNamespace(batch_size=batch_size), world_size=world_size,
                                      accumulate_grad_batches=accumulate, global_step=global_step, current_epoch=0,
                                      estimated_stepping_batches=100)
    return module


def batch(n=6, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    captions = torch.randint(4, len(VOCAB["itos"]), (n, length), generator=g)
    captions[:, 0] = 1
    captions[:, -1] = 2
    captions[n // 2:, -2:] = torch.tensor([2, 0])  # some captions end earlier: padding in the batch
    return captions


@pytest.mark.parametrize("rule,batch_size,world,accumulate,expected", [
    ("sqrt", 512, 1, 1, math.sqrt(8)), ("sqrt", 64, 4, 1, 2.0), ("linear", 128, 2, 2, 8.0), ("linear", 64, 1, 1, 1.0),
    ("none", 1024, 1, 1, 1.0), ("sqrt", 16, 1, 1, 0.5)])
def test_the_learning_rate_scales_with_the_effective_batch(rule, batch_size, world, accumulate, expected):
    module = attach(lstm_module(lr_scaling={"rule": rule, "base_batch_size": 64},
                                optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
                                scheduler=lambda opt, total_steps: warmup_cosine_schedule(opt, total_steps, 0.1)),
                    batch_size, world, accumulate)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert scheduler.base_lrs == pytest.approx([1e-3 * expected])  # the schedule's peak is the scaled rate
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * expected / 10)  # first warm-up step: 1/10


def test_stage_scst_keeps_its_rate_at_its_own_batch_of_images():
    from captioner.config import compose

    cfg = compose(["stage=scst", "init_from=x.ckpt"])
    assert cfg.lr_scaling.base_batch_size == cfg.loader.batch_size == 16  # 16 images: the rate is not scaled


@pytest.mark.parametrize("every", [None, 4])
def test_a_non_finite_loss_is_reported_with_its_own_step_however_often_it_is_read(every):
    """every=None on the CPU: at once. every=4 (what a GPU does every 50 steps, without reading the loss on the host
    in between): at the next multiple of 4, naming the step it happened at, and before any checkpoint or
    validation."""
    module = attach(lstm_module())
    module.finite_check_every = every
    losses = [torch.tensor(2.0), torch.tensor(float("nan")), torch.tensor(1.5), torch.tensor(float("inf"))]
    raised_at = None
    for step, loss in enumerate(losses):
        module._trainer.global_step = step
        try:
            module._check_finite(loss)
        except FloatingPointError as e:
            raised_at, message = step, str(e)
            break
        if step == 1:  # recorded, not read yet: saving or validating now must not go ahead
            for hook in (lambda: module.on_save_checkpoint({}), module.on_validation_start):
                with pytest.raises(FloatingPointError, match="at step 1 "):
                    hook()
    assert raised_at == (1 if every is None else 3)
    assert "training loss became nan at step 1 " in message and "ckpt_path=last" in message


def test_finite_losses_pass_every_check():
    module = attach(lstm_module())
    module.finite_check_every = 2
    for step in range(5):
        module._trainer.global_step = step
        module._check_finite(torch.tensor(1.0 / (step + 1)))
    module.on_save_checkpoint({})
    module.on_train_epoch_end()


@pytest.mark.parametrize("family", ["lstm_init", pytest.param("attention", marks=pytest.mark.slow)])
def test_the_compiled_training_loss_equals_the_eager_one_and_its_gradients(family):
    """compile=true changes how the loss is computed (torch.compile: fused kernels), not what: the loss and every
    gradient equal the eager ones, over batches of different sizes and lengths (dynamic shapes, no recompile per
    shape), the attention family with its regulariser. (Inductor's C++ code generation here; Triton's on a GPU.)"""
    build = (lambda **kw: lstm_module(**kw)) if family == "lstm_init" else \
        (lambda **kw: _attention(**kw))
    eager, compiled = build(), build(compile=True)
    compiled.load_state_dict(eager.state_dict())
    for n, length in ((6, 7), (9, 5)):
        captions = batch(n, length, seed=n)
        features = torch.randn((n // 2 + 1, 4, 8) if family == "attention" else (n // 2 + 1, 8),
                               generator=torch.Generator().manual_seed(length))
        image = torch.arange(n) // 2
        losses = []
        for module in (eager, compiled):
            module.zero_grad()
            loss = module.training_loss_function()(features, captions, image)
            loss.backward()
            losses.append(loss)
        assert compiled._compiled_loss is not None and eager._compiled_loss is None
        assert losses[1].item() == pytest.approx(losses[0].item(), rel=1e-5)
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def _attention(compile=False):
    module = attention_module(alpha_c=1.0)
    module.compile_training = compile
    return module
