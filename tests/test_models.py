"""Each of the five variants over-fits a few shapes images through the real LightningModule + DataModule."""

import lightning as L
import pytest
import torch

from captioner.config import compose
from captioner.data.vocabulary import normalize
from captioner.metrics import caption_metrics
from captioner.training import ConfigError, build_datamodule, build_model, check_config

VARIANTS = ["resnet_rnn", "dino_rnn", "dino_lstm", "dino_lstm_init", "dino_attention"]


@pytest.fixture(scope="module")
def few_images_root(tmp_path_factory):
    return tmp_path_factory.mktemp("overfit")


def overfit_config(model, root):
    return compose([
        f"model={model}", f"paths.root_dir={root}", "data.num_train=8", "data.num_val=2", "data.num_test=2",
        "data.captions_per_image=1", "text.min_word_count=1", "loader.batch_size=8", "features.num_workers=0",
        "scheduler.name=none", "optimizer.lr=3e-3", "decoder.dropout=0.0", "metrics.meteor=false",
        "trainer.max_epochs=1",
    ])


@pytest.mark.parametrize("model", VARIANTS)
def test_variant_overfits_a_few_images(model, few_images_root):
    torch.manual_seed(0)
    cfg = overfit_config(model, few_images_root)
    assert cfg.encoder.name == "efficientnet_lite0"  # experiment=shapes_offline swaps the encoder in
    dm = build_datamodule(cfg)
    dm.progress = False
    dm.prepare_data()
    dm.setup("fit")
    module = build_model(cfg, dm)
    assert (module.family == "attention") == (model == "dino_attention")
    batch = next(iter(dm.train_dataloader()))
    optimizer = module.configure_optimizers.__self__.optimizer_factory(params=module.parameters())
    losses = []
    module.train()
    for _ in range(250):
        loss = module.caption_loss(batch["features"], batch["captions"], batch["caption_image"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])
    module.eval()
    with torch.inference_mode():
        hyps = module.generate(batch["features"])
    refs = [[normalize(c) for c in r.captions] for r in dm.records["train"]]
    order = batch["caption_image"].tolist()
    assert caption_metrics(hyps, [refs[i] for i in sorted(set(order))], meteor=False)["bleu_4"] > 0.9


def test_config_mismatches_are_refused_with_the_keys_to_change():
    with pytest.raises(ConfigError, match="decoder=transformer"):
        check_config(compose(["model=dino_lstm", "decoder=transformer"]))
    with pytest.raises(ConfigError, match="attention=mha"):
        check_config(compose(["model=dino_lstm", "attention=mha"]))
    check_config(compose(["model=dino_attention"]))


def test_checkpoint_hyperparameters_carry_vocab_and_encoder(few_images_root):
    cfg = overfit_config("dino_attention", few_images_root)
    dm = build_datamodule(cfg)
    dm.progress = False
    dm.prepare_data()
    dm.setup("fit")
    module = build_model(cfg, dm)
    hp = module.hparams
    assert hp.vocab["itos"] == dm.vocab.itos
    assert hp.encoder["name"] == "efficientnet_lite0" and hp.encoder["weights"] == "package"
    assert hp.encoder["input_size"] == 224 and hp.encoder["crop_pct"] == 1.0
    assert hp.decoder["name"] == "transformer" and tuple(hp.grid) == (7, 7)
    assert "optimizer" not in hp


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_fused_adamw_gradients_are_clipped_under_lightning(precision, few_images_root):
    """conf/optimizer/adamw.yaml's fused AdamW with trainer.gradient_clip_val: Lightning's mixed-precision plugin
    refuses to clip for a fused optimizer; the module clips itself where no grad scaler is involved."""
    cfg = overfit_config("dino_lstm_init", few_images_root)
    assert cfg.optimizer.fused is True
    dm = build_datamodule(cfg)
    dm.progress = False
    dm.prepare_data()
    dm.setup("fit")
    module = build_model(cfg, dm)
    norms = []

    class GradNorm(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):  # after clipping and the optimizer step
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    trainer = L.Trainer(accelerator="cpu", precision=precision, gradient_clip_val=1e-3, max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[GradNorm()])
    trainer.fit(module, datamodule=dm)
    assert len(norms) == 2 and max(norms) <= 1e-3 * (1 + 1e-3)
