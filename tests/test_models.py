"""Every variant over-fits a few shapes images through the real LightningModule + DataModule."""

import lightning as L
import pytest
import torch

from conftest import doubly_stochastic_reference

from captioner.config import compose, options
from captioner.data.vocabulary import normalize
from captioner.scoring.metrics import caption_metrics
from captioner.training import ConfigError, build_datamodule, build_model, check_config

VARIANTS = options("model")


@pytest.fixture(scope="module")
def few_images_root(tmp_path_factory):
    return tmp_path_factory.mktemp("overfit")


def overfit_config(model, root):
    return compose([
        f"model={model}", f"paths.root_dir={root}", "data.num_train=8", "data.num_val=2", "data.num_test=2",
        "data.captions_per_image=1", "text.min_word_count=1", "loader.batch_size=8", "features.num_workers=0",
        "scheduler=none", "optimizer.lr=3e-3", "decoder.dropout=0.0", "metrics.meteor=false",
        "trainer.max_epochs=1",
    ])


@pytest.mark.e2e
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
    assert (module.family == "attention") == (model in ("dino_attention", "dino_sat"))
    batch = next(iter(dm.train_dataloader()))
    optimizer = module.configure_optimizers.__self__.optimizer_factory(params=module.parameters())
    refs = [[normalize(c) for c in r.captions] for r in dm.records["train"]]
    refs = [refs[i] for i in sorted(set(batch["caption_image"].tolist()))]
    losses = []
    for step in range(1, 251):  # within 250 steps; checked every 25 (the recurrent ones pass at 25, attention 100)
        module.train()
        loss = module.caption_loss(batch["features"], batch["captions"], batch["caption_image"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 25 == 0:
            module.eval()
            with torch.inference_mode():
                bleu_4 = caption_metrics(module.generate(batch["features"]), refs, meteor=False)["bleu_4"]
            if losses[-1] < 0.1 * losses[0] and bleu_4 > 0.9:
                break
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])
    assert bleu_4 > 0.9, bleu_4


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
    assert hp.decoder["_target_"] == "captioner.decoders.TransformerDecoder" and tuple(hp.grid) == (7, 7)
    assert hp.decoder["attention"] == {"_target_": "captioner.decoders.MultiHeadAttention", "_partial_": True,
                                       "num_heads": 4}
    assert "optimizer" not in hp and "scheduler" not in hp


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


def attention_module(alpha_c: float, seed: int = 0):
    """A small AttentionCaptioner as the config builds it (transformer decoder, multi-head attention)."""
    from captioner.modules import AttentionCaptioner

    torch.manual_seed(seed)
    decoder = {"_target_": "captioner.decoders.TransformerDecoder", "_partial_": True, "d_model": 16,
               "encoder_layers": 1, "decoder_layers": 1, "ff_dim": 32, "dropout": 0.0,
               "attention": {"_target_": "captioner.decoders.MultiHeadAttention", "_partial_": True, "num_heads": 2}}
    vocab = {"itos": ["<pad>", "<sos>", "<eos>", "<unk>"] + [f"w{i}" for i in range(10)]}
    return AttentionCaptioner(alpha_c=alpha_c, vocab=vocab, decoder=decoder, encoder={"name": "efficientnet_lite0"},
                              feature_dim=8, grid=(2, 2))


def test_the_attention_regulariser_is_show_attend_tells_doubly_stochastic_term():
    feats = torch.randn(2, 4, 8)
    caps = torch.tensor([[1, 4, 5, 2, 0], [1, 6, 7, 8, 2]])
    index = torch.tensor([0, 1])
    off, on = attention_module(0.0), attention_module(0.5)
    on.load_state_dict(off.state_dict())
    assert torch.equal(off.training_loss(feats, caps, index), off.caption_loss(feats, caps, index))
    logits, att = on.decoder(feats, caps, index, return_attention=True)
    expected = float(on.caption_loss(feats, caps, index)) + 0.5 * doubly_stochastic_reference(att, caps)
    assert float(on.training_loss(feats, caps, index)) == pytest.approx(expected, rel=1e-5)
    on.training_loss(feats, caps, index).backward()  # the term is differentiable end to end
    assert on.decoder.blocks[0].cross_attn.q.weight.grad is not None


def test_a_pooled_family_refuses_a_decoder_that_reads_spatial_tokens():
    from captioner.modules import PooledCaptioner

    module = attention_module(0.0)
    with pytest.raises(ValueError, match="PooledCaptioner feeds its decoder pooled features"):
        PooledCaptioner(vocab=module.hparams.vocab, decoder=module.hparams.decoder, encoder=module.hparams.encoder,
                        feature_dim=8, grid=(2, 2))


def test_the_attention_family_keeps_per_word_maps_of_a_few_test_images():
    module = attention_module(0.0).eval()
    module.attention_maps_kept = 3
    module.on_test_epoch_start()
    module.log = lambda *args, **kwargs: None  # no trainer here
    batch = {"features": torch.randn(2, 4, 8), "captions": torch.tensor([[1, 4, 2], [1, 5, 2]]),
             "caption_image": torch.tensor([0, 1]), "index": torch.tensor([7, 9]), "references": [["w0"], ["w1"]]}
    with torch.no_grad():
        module.test_step(batch, 0)
        module.test_step({**batch, "index": torch.tensor([11, 12])}, 1)
    samples = module.attention_samples
    assert [s["index"] for s in samples] == [7, 9, 11]
    for s, out in zip(samples, module.eval_outputs):
        maps = torch.tensor(s["maps"])
        assert s["words"] == out["hypothesis"].split() and maps.shape == (len(s["words"]), 2, 2)
        torch.testing.assert_close(maps.sum((1, 2)), torch.ones(len(s["words"])), rtol=0, atol=1e-3)
