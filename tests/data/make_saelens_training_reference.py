"""Reference for tests/test_train.py: SAELens 6.54.12's own trainer (`SAETrainer._train_step`)
takes five steps of each architecture on fixed activations, from its own initial parameters;
the initial parameters, the batches, the dead-latent counters, and after each step the
parameters and the loss terms are written to `saelens_training_reference.npz`.

    $SAELENS_PYTHON tests/data/make_saelens_training_reference.py [OUT.npz]

(SAELens lives in its own virtual environment: `pip install sae-lens==6.54.12 torch==2.13.0`.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer

D_IN, D_SAE, BATCH, STEPS, WINDOW = 16, 64, 32, 5, 5
DEAD = 20  # latents made dead before the first step (their counters past the window)

CASES = {
    "relu": (StandardTrainingSAE, StandardTrainingSAEConfig, dict(
        l1_coefficient=2.0, l1_warm_up_steps=2, apply_b_dec_to_input=True)),
    "jumprelu": (JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, dict(
        l0_coefficient=0.5, l0_warm_up_steps=2, jumprelu_bandwidth=0.5,
        jumprelu_init_threshold=0.2, apply_b_dec_to_input=False)),
    "jumprelu-tanh": (JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, dict(
        l0_coefficient=0.5, jumprelu_bandwidth=0.5, jumprelu_init_threshold=0.2,
        jumprelu_sparsity_loss_mode="tanh", jumprelu_ste_to_input=True,
        pre_act_loss_coefficient=0.1, apply_b_dec_to_input=True)),
    "topk": (TopKTrainingSAE, TopKTrainingSAEConfig, dict(k=6, aux_loss_coefficient=0.5,
                                                         apply_b_dec_to_input=False)),
    "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, dict(
        k=6.0, aux_loss_coefficient=0.5, topk_threshold_lr=0.1, apply_b_dec_to_input=True)),
}


def main(out: Path) -> None:
    arrays: dict[str, np.ndarray] = {}
    for case_index, (name, (sae_class, config_class, fields)) in enumerate(CASES.items()):
        torch.manual_seed(100 + case_index)
        sae = sae_class(config_class(d_in=D_IN, d_sae=D_SAE, **fields))
        batches = torch.randn(STEPS, BATCH, D_IN) * 2 + 0.5
        trainer = SAETrainer(
            SAETrainerConfig(total_training_samples=BATCH * 6, train_batch_size_samples=BATCH,
                             lr=1e-2, lr_warm_up_steps=2, lr_decay_steps=3, lr_end=1e-3,
                             adam_beta1=0.8, adam_beta2=0.99, dead_feature_window=WINDOW),
            sae, data_provider=iter(batches))
        trainer.n_forward_passes_since_fired[:DEAD] = WINDOW + 1
        arrays[f"{name}/since_fired"] = trainer.n_forward_passes_since_fired.numpy().copy()
        arrays[f"{name}/batches"] = batches.numpy()
        for field, value in sae.state_dict().items():
            arrays[f"{name}/init/{field}"] = value.detach().double().numpy().copy()
        for step in range(STEPS):
            output = trainer._train_step(sae, batches[step])
            trainer.n_training_steps += 1
            for field, value in sae.state_dict().items():
                arrays[f"{name}/step{step}/{field}"] = value.detach().double().numpy().copy()
            for loss, value in output.losses.items():
                arrays[f"{name}/step{step}/loss/{loss}"] = np.asarray(float(value.detach()))
            arrays[f"{name}/step{step}/loss/total"] = np.asarray(float(output.loss.detach()))
            arrays[f"{name}/step{step}/feature_acts"] = output.feature_acts.detach().numpy()
            arrays[f"{name}/step{step}/since_fired"] = (
                trainer.n_forward_passes_since_fired.numpy().copy())
    np.savez_compressed(out, **arrays)
    print(f"wrote {len(arrays)} arrays to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else
         Path(__file__).with_name("saelens_training_reference.npz"))
