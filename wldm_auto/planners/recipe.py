"""Why the training recipe is what it is: each choice with the measurement that justified it.

The planner copies these notes into every plan (``configurations.*.notes``), beside the values
they explain, so a user editing ``plans.json`` sees what a change is likely to cost. Figures come
from ``bench/fidelity.py`` runs and single-factor runs on its data (two CPU cores; validation case:
a simulated abdomen, a proxy, not patients; MAE in HU inside body AND real CT on the 3 mm grid).
"""
from __future__ import annotations

RECIPE_NOTES: dict[str, str] = {
    "vae_reconstruction_loss": (
        "L1 per voxel (MR and CT each averaged over their own voxels) instead of the paper's L2: in the [-1, 1] "
        "units of the [-1024, 3071] HU window a 50 HU soft-tissue error is 0.024, whose square (6e-4) L2 all but "
        "ignores. Same VAE, 800 steps: CT reconstruction MAE 68.6 HU with L2, 54.1 HU with L1."),
    "vae_normalization": (
        "'voxel' (LayerNorm over the channels of each voxel) instead of GroupNorm: GroupNorm statistics of a "
        "16x32x32 training patch differ from those of a larger tile, so a GroupNorm VAE reconstructed the validation "
        "CT at 66.7 HU with patch-sized tiles but 90.8 / 118.5 / 120.2 HU with 2x / 4x / whole-volume tiles; the "
        "voxel-normalised VAE gave 67.7 / 68.6 / 70.1 HU, so validation and inference use 4x tiles "
        "(inference.image_tile_scale; 68 s -> 12 s for that volume)."),
    "vae_kl_weight": (
        "1e-6 times the KL averaged over latent elements (it was summed, 2048 times stronger at a 16x32x32 patch "
        "than a per-voxel reconstruction loss can balance): 68.6 HU after 800 steps against 85.4 HU with the summed "
        "weight. The posterior log-variance starts at -10 so a fresh decoder is not fed pure noise."),
    "vae_adversarial": (
        "adv_weight 0.05 from adv_start_step on GPU-length runs; off in the cpu preset: switched on at step 450 of "
        "800 it lifted validation MAE from 79.9 to 97.3 HU in the next epoch, and minutes of CPU training leave no "
        "time to recover."),
    "diffusion_prediction": (
        "x0-prediction with an unweighted loss (WDM's recipe) instead of the paper's epsilon. Epsilon: the x0 "
        "estimate at high noise divides the predicted noise by sqrt(abar_T) = 0.0064, so every error is amplified "
        "156x and sampling from pure noise fails at CPU training lengths. v with min-SNR-5 weighting (2000 steps): "
        "x0 estimates at mid noise were worse than at pure noise (latent RMSE 0.48 at t=200 vs 0.20 at t=999) and "
        "DDIM drifted away from the one-step estimate (53.8 HU at 1 step, 158 at 10, 174 at 20; validation "
        "171 HU). x0, unweighted (same VAE, same steps): estimates improve as noise falls (0.174 at t=999, 0.139 "
        "at t=200) and DDIM stays near them (46.7 HU at 1 step, 50.0 at 10; validation 50.0 HU)."),
    "vae_smd": (
        "smd_weight 0.01 (the paper gives no value) with smd_pooled_modality: L_modal compares the channel means "
        "of the modality halves M instead of M voxel by voxel. Voxel by voxel, L_modal reached -3.9 of its minimum "
        "-4 by making M one constant code per modality, so half of the latent carried no image: MR reconstruction "
        "lost 1.1 dB (validation PSNR 25.32 vs 26.43 without SMD), the first-stage ceiling on the fidelity "
        "benchmark's test cases was 55.9 HU (52.7 without SMD) and the 3D-WLDM sCT 92.3 HU (80.3 for LDM + WRM). "
        "Pooled, L_modal reaches -3.94 while M keeps its voxels: ceiling 50.3 HU (700 VAE steps, same budget and "
        "seed; per test case 77.7 / 30.5 / 32.1 / 61.0 against 78.4 / 34.7 / 36.4 / 74.0). Tried and not kept: "
        "smd_weight 0.001 (L_modal stays near 0: SMD effectively off), per-channel latent standardisation (59.7 vs "
        "54.7 HU diffusion validation at 1280 steps)."),
    "diffusion_image_loss": (
        "image_loss_weight 0 (off). With 1.0 (masked L1 of the decoded clean-latent estimate against the CT "
        "patch, added to the latent loss), same VAE, budget and seed, the 3D-WLDM diffusion stage reached 49.8 HU "
        "validation MAE at 1200 steps against 56.0 HU without, and the simulated abdomen test cases 54.3 / 53.8 HU "
        "against 58.9 / 58.8; but the phantom slab (148.9 vs 141.8) and the thin DICOM case (95.1 vs 92.1) got "
        "worse, so the test mean did not move (88.0 vs 87.9 HU). Each step also decodes the patch (about 1.5x the "
        "step time on CPU). Again after the encoder's edge padding (2026-12-02, shortcut off, seed 12345): 84.8 "
        "against 85.5 HU (per case 143.1 / 54.5 / 54.9 / 86.7; validation 42.6 against 45.1 HU; 626 against 501 s "
        "of training), less than one diffusion seed's spread (+- 2.5 HU). Worth measuring again on a GPU budget."),
    "diffusion_latent_loss": (
        "latent_loss l2 (the paper's) kept. With l1 (same VAE, budget and seed; fidelity benchmark, 10 DDIM "
        "steps) the 3D-WLDM test MAE fell from 88.9 to 83.9 HU (per case 131.9 / 55.3 / 56.0 / 92.6 against "
        "141.9 / 59.8 / 59.0 / 95.1; validation 47.7 against 56.0 HU at 1200 steps), but bone Dice of the "
        "abdomen cases from 0.10 to 0.005: an L1 x0 estimate is a conditional median, and the median of the "
        "few bone voxels' latents is soft tissue. For radiotherapy and attenuation maps bone matters more "
        "than 5 HU of soft-tissue MAE."),
    "diffusion_sampling": (
        "inference.ddim_steps 10, samples 1 on the fidelity benchmark. Same trained 3D-WLDM, its 4 test cases "
        "(test MAE HU / bone Dice of the abdomen cases): 1 step 84.7 / 0.00, 3 steps 86.7 / 0.01, 10 steps "
        "88.9 / 0.10, 10 steps x 5 samples averaged 88.7 / 0.07, 1 step x 5 samples 83.8 / 0.00. With x0-"
        "prediction one step is the posterior-mean estimate from pure noise: the lowest MAE, but no bone above "
        "250 HU and samples that barely differ (no usable std map); more steps add detail at a few HU of MAE, "
        "and averaging samples changes little because the x0 estimates depend mostly on the MR. After the "
        "encoder's edge padding (2026-12-02, shortcut off, same model): the one-step posterior mean 87.4, 10 steps "
        "85.5, 20 steps 86.2 HU (bone Dice 0.000 / 0.000 / 0.001): 10 steps kept. With the width-4 shortcut and "
        "timestep_power 2 (2026-12-02, 350 + 1550 steps, seed 12345): 5 steps 80.9, 10 steps 81.1, 20 steps 81.4 "
        "HU (bone Dice 0.037 / 0.044 / 0.053); 10 steps x 3 samples averaged 81.1 (the samples' std 2.6 HU on "
        "average: at high noise the clean estimate is the MR's, whatever the starting noise)."),
    "vae_weights_and_rate": (
        "ct_weight 1, learning_rate 2e-3 and blocks_per_level 1 kept (fidelity benchmark, 700 VAE steps, "
        "validation CT MAE at steps 175 / 350 / 525 / 700): baseline 149.6 / 47.2 / 34.6 / 29.8 HU with MR PSNR "
        "24.9 dB at the end; ct_weight 3: 117.6 / 59.9 / 31.1 / 29.8 HU but MR PSNR 23.5 dB (the CT gains "
        "nothing, the MR latent loses); learning rate 4e-3: 78.4 / 46.1 / 36.6 / 32.9 HU; 2 blocks per level: "
        "79.1 / 75.8 HU at steps 175 / 350 (stopped there, behind the baseline and slower per step)."),
    "vae_ema": (
        "ema_decay 0 (off) for the VAE: an average with decay 0.99 gave a first-stage ceiling of 57.7 HU against "
        "55.9 HU without (700 steps, voxel-wise SMD), and 51.2 against 50.3 HU with pooled SMD. The diffusion "
        "U-Net keeps its EMA (diffusion.ema_decay)."),
    "vae_shortcut": (
        "planner defaults (GPU-sized, 4x): vae.shortcut 0 (off) and diffusion.center_latents false, not measured "
        "at 4x; the cpu preset switches both on (its note vae_shortcut_cpu gives the figures after the encoder's "
        "edge padding). Before that padding: fidelity benchmark, 3D-WLDM, 700 VAE + 1200 diffusion steps, seed "
        "12345, 1 sample, 10 DDIM steps (2026-12-01; first-stage ceiling / test sCT MAE HU, per "
        "case phantom / abdomen / abdomen / thin DICOM, bone Dice): off 62.7 / 90.4 (143.3 / 57.7 / 58.0 / 102.6), "
        "0.000, over 3 diffusion seeds 93.3 +- 2.5; shortcut 8 (lossless at 2x with 8 latent channels: the VAE "
        "learns the identity, validation CT 0.0 HU) 17.9 (the resampling floor) / 105.6; shortcut 8 + center_latents "
        "17.9 / 94.9 (141.5 / 59.4 / 59.5 / 119.2), 0.082, over 3 seeds 98.8 +- 3.8 (bone 0.076); shortcut 4 + "
        "center_latents 30.7 / 97.6, 0.067; shortcut 1 59.5 / 95.4, with center_latents 96.1; center_latents alone "
        "62.7 / 94.2. After the diffusion loss's edge fix (latent_valid): off 90.7, shortcut 8 + center_latents 93.1 "
        "(thin DICOM case 102.9 against 108.4). A first stage at the resampling floor does not make a better sCT "
        "at this budget: the diffusion stage is what limits it. Sharper latents give some bone (Dice 0.15 on the "
        "abdomen cases) and the phantom "
        "slab gains 2 HU, but the thin DICOM case (11 slices) loses 17-39 HU. Without centring, the x0 denoiser of a "
        "lossless latent (channel means -0.55, -3.7 after the scale 6.7) was at 287 HU validation MAE after 300 "
        "steps (51 HU centred): an Adam step moves each weight by about the learning rate (1e-3)."),
    "residual_sct_estimate": (
        "residual_diffusion.sct_estimate posterior_mean: the sCT is the regression prior plus the denoiser's "
        "one-step clean estimate of the residual (its estimate of the mean residual), the samples give the std. "
        "Fidelity benchmark, the regression row's trained U-Net as prior (66.5 HU test MAE), residual U-Net "
        "[32, 64] on Haar bands, 1200 steps, 10 DDIM steps: the mean of 1 / 5 samples 75.8 / 71.0 HU, worse "
        "than the prior on every case; the posterior-mean estimate 66.4 HU (per case 131.3 / 36.6 / 36.1 / "
        "61.4 against the prior's 132.3 / 36.3 / 36.0 / 61.5), SSIM 0.872 like the prior. The residual is "
        "mostly not predictable from MR and prior at this budget: the learned mean correction is near 0 and "
        "every sample adds its own spread (a calibrated sample's error is about sqrt(2) x the mean's)."),
    "residual_prior_folds": (
        "residual_diffusion.prior_folds own (the fold's regression predicts its own training cases) kept. "
        "out_of_fold (each training case's prior from the regression fold that held it out; fidelity benchmark, "
        "7 training cases in 3 cross-fitting folds, 4 x 1900 regression steps, same 1200 residual steps and seed, "
        "5 samples, 2026-12-01): posterior-mean sCT 78.7 against 70.0 HU (prior 69.6; per test case 150.5 / "
        "39.7 / 40.0 / 84.6 against 139.7 / 37.4 / 37.2 / 65.6), voxel Spearman |error|-std 0.27 against 0.20, "
        "AUSE 37.9 against 35.9 HU, calibrated coverage at 2 std 0.93 against 0.92, case Spearman / Pearson "
        "0.80 / 0.91 against 0.60 / 0.48. On the training cases the fold-0 prior was as wrong as on held-out "
        "ones (simulated abdomen training cases 34-39 HU, the held-out abdomen cases 37-39 HU), so at this budget the "
        "own prior hides nothing; the cross-fitting folds, trained on 4-5 of 7 cases of 4 kinds, had never "
        "seen the anatomy of the cases they predicted (the only DICOM-derived case, both phantom-derived ones), "
        "and the residual model learnt corrections for errors the fold-0 prior does not make (DICOM test case "
        "+19 HU). Use out_of_fold with a cross-validation split of a cohort whose folds each represent it."),
    "residual_prior_blur": (
        "residual_diffusion.prior_blur_mm 0 (off) kept. With 6 (each training batch's prior smoothed by a Gaussian "
        "of sigma uniform in [0, 6] mm, so that the model learns to restore what a smooth prior lacks, as cascaded "
        "diffusion models corrupt their conditioning; fidelity benchmark, seed 12345, the regression fold 0 of the "
        "L1 run as prior (67.43 HU), image weight 30, timestep power 3, bone weight 4, L1 latent loss, 2026-12-07): "
        "68.26 HU (134.2 / 36.7 / 36.4 / 65.8 against 134.6 / 35.9 / 36.0 / 63.2), bone Dice 0.152 against 0.148, "
        "SSIM 0.8727 against 0.8749, MS-SSIM 0.8788 against 0.8806; validation MAE 27.35 -> 27.54 HU over training. "
        "The same trade as an unsharp mask of the prior (a 0.5: 68.16 HU, bone Dice 0.158): more bone for MAE."),
    "inference_mirroring": (
        "inference.mirror_axes [] (off) by default: test-time mirroring costs 2 ** len(axes) times the prediction "
        "time. With [0, 1, 2] (fidelity benchmark's test cases, trained models, 10 DDIM steps, one sample per "
        "mirroring): MAE regression 66.5 -> 66.2 HU, 3D-WLDM 88.6 -> 86.6, wavelet-domain 109.1 -> 102.6, "
        "residual 66.4 -> 65.8; the std over the 8 draws ranks the errors better than 5 diffusion samples do "
        "(voxel Spearman |error|-std: regression 0.47, 3D-WLDM 0.41, wavelet-domain 0.38, residual 0.22, against "
        "0.22 / 0.27 / 0.14 from samples). Switch it on where time allows: a regression U-Net's error head "
        "(regression_error_head) gives a single fold a std map from one pass, but ranks the errors less well."),
    "regression_error_head": (
        "regression.error_head true in new plans (2026-12-06; the schema's default stays false, so a plan written "
        "before has no head): a second head on the U-Net's detached last features learns the expected absolute "
        "error of each voxel (Laplace likelihood), clipped apart, so the sCT is bit for bit the plain U-Net's and a "
        "single regression fold writes a std map from one pass at no measurable prediction time. Fidelity "
        "benchmark's test cases (cpu preset, seed 12345, 1900 steps): sCT 67.4 HU either way; the head's std: "
        "voxel Spearman |error|-std 0.37, AUSE 25.2 HU, coverage at 2 std 0.86 before any calibration (0.93 / "
        "0.95 on the simulated abdomens, 0.70 on the phantom slab), case Spearman / Pearson 0.60 / 0.36; "
        "8 mirrorings without the head 0.47, 16.9 HU, 0.30 raw and 0.91 calibrated, at 8x the prediction time; "
        "both together 0.40 (the head's larger std dominates the sum of variances)."),
    "inference_edge_std": (
        "inference.edge_std_mm 4 in new plans (2026-12-06; the schema's default stays 0, so a plan written before "
        "keeps its std maps): every std map gains, in variance, 4 mm times the sCT's gradient magnitude (HU/mm, "
        "smoothed over 2 mm), the HU change a structure 4 mm off would make. The head learns its errors on training "
        "cases, where the U-Net has fitted the edges; on new cases the largest errors sit along bone, air and the "
        "body's outline. Fidelity benchmark's test cases, regression U-Net with its head (sCT 67.4 HU unchanged): "
        "voxel Spearman |error|-std 0.37 -> 0.47 (2 mm: 0.44, 8 mm: 0.47), AUSE 25.2 -> 18.9 HU, coverage at 2 std "
        "0.86 -> 0.95 before any calibration, case Pearson / Spearman 0.36 / 0.60 -> 0.83 / 1.00; 4 mm was chosen "
        "on the validation case (its Spearman 0.355 at 4 mm, 0.349 at 8, 0.345 at 2), 8 mirrorings without it: 0.47 "
        "at 8x the time."),
}

EDGE_STD_MM = 4.0  # what the planner writes into inference.edge_std_mm (recipe note inference_edge_std)

CPU_NOTES: dict[str, str] = {
    "budget_split": (
        "fidelity benchmark: 350 VAE + 1550 diffusion steps (2026-12-02; was 700 + 1200). With the width-4 shortcut "
        "the VAE has learnt what it will by step 350 (validation CT MAE 19.3 HU after 350 steps of a 350-step run, "
        "19.8 after 700 of a 700-step run), while the diffusion U-Net's validation was still falling at 1200 steps "
        "(48.9 -> 45.5 HU over the last 300). 3D-WLDM, seed 12345, 1 sample: 84.7 HU (per case 141.3 / 55.4 / 55.4 / "
        "86.6, ceiling 31.6, validation 43.5) against 85.7 (ceiling 30.7, validation 45.5), within one diffusion "
        "seed's spread but never worse. Before the shortcut the VAE needed its steps: 1000 + 900 (seed 0) gave a "
        "ceiling of 46.7 HU against 53.1 but the sCT 92.4 HU against 88.9 at 700 + 1200."),
    "diffusion_timestep_power_cpu": (
        "cpu preset: diffusion.timestep_power 2, now 3 with image_loss_weight 10 (note diffusion_image_weight_cpu); "
        "2 (training timesteps t = T - 1 - floor(T u ** 2): 71 % at t >= T/2 "
        "instead of 50 %); the planner's default stays 1 (uniform, the paper's), not measured at GPU length. With "
        "x0-prediction the sCT's MAE is decided at high noise, where the denoiser's clean estimate depends on the "
        "MR alone (one DDIM step from pure noise is within 2 HU of ten); uniform timesteps spend half the steps "
        "where the estimate is the noisy input's own. Fidelity benchmark, 3D-WLDM, 350 VAE + 1550 diffusion steps "
        "on the same VAE, seed 12345, 1 sample, 10 DDIM steps (test MAE HU, per case phantom / abdomen / abdomen / "
        "thin DICOM; bone Dice; diffusion validation HU): power 1 84.7 (141.3 / 55.4 / 55.4 / 86.6); 0.058; 43.5. "
        "Power 2 81.1 (135.0 / 53.7 / 53.4 / 82.5); 0.044 (0 / 0.091 / 0.083 / 0); 42.2. Power 3 80.2 (131.9 / 54.3 / "
        "52.9 / 82.0); 0.001; 42.7: the MAE a little lower again but the bone gone (as with the L1 latent loss, "
        "recipe note diffusion_latent_loss), so 2. Diffusion seeds 1 and 2 on the same VAE: power 1 82.3 / 83.4 "
        "HU, power 2 79.8 / 80.1 HU, lower on every case of every seed; over the three seeds 83.5 +- 1.2 against "
        "80.3 +- 0.7 HU, bone Dice 0.070 against 0.050. The Haar-space "
        "sections (wavelet_diffusion, residual_diffusion) use 2 as well: wavelet-domain 1900 steps 104.3 -> 98.8 HU "
        "(170.7 / 73.7 / 74.6 / 98.2 -> 164.7 / 67.1 / 68.6 / 94.8), residual on the regression U-Net 1550 steps "
        "70.2 -> 69.8 HU (the prior alone 69.6)."),
    "diffusion_image_loss_cpu": (
        "cpu preset: diffusion.image_loss_weight 1, now 10 (note diffusion_image_weight_cpu); 1 (2026-12-02; the "
        "planner's default stays 0, not measured at GPU "
        "length): with timestep_power 2 the decoded L1 no longer costs the phantom slab (recipe note "
        "diffusion_image_loss). Fidelity benchmark, 3D-WLDM, 350 + 1550 steps on the same VAE, 1 sample, 10 DDIM "
        "steps, diffusion seeds 12345 / 1 / 2 / 3 (test MAE HU; diffusion validation HU; bone Dice): with the image "
        "loss 79.4 / 78.8 / 80.3 / 81.7 (seed 12345 per case 134.3 / 50.5 / 50.3 / 82.5); 38.8 / 39.3 / 40.5 / "
        "39.9; 0.012 / 0.059 / 0.037 / 0.075. Without 81.1 / 79.8 / 80.1 / 82.7; 42.2 / 41.0 / 42.1 / 40.7; 0.044 / "
        "0.064 / 0.044 / 0.058. Over the four seeds 80.0 +- 1.3 against 80.9 +- 1.3 HU (paired -1.7 / -1.0 / +0.2 / "
        "-1.0: less than the spread between seeds), validation lower on every seed by 0.8-3.4 HU, SSIM 0.848-0.849 "
        "against 0.846, bone Dice 0.046 against 0.053, and training 1.2x longer (504-555 s against 386-446 s). "
        "The three ablation rows gained 2.1-3.9 HU with it (vanilla 85.7 -> 81.8, + WRM 83.4 -> 79.7, + WRM + SMD "
        "81.0 -> 78.9). Not set in the Haar-space sections: the residual model on the regression U-Net (1550 steps, "
        "seed 12345) 69.9 against 69.8 HU with it (the prior alone 69.6)."),
    "diffusion_image_weight_cpu": (
        "cpu preset: diffusion.image_loss_weight 10 with timestep_power 3 (2026-12-02, later; were 1 and 2). At "
        "weight 1 the decoded L1 is a small part of the loss (train latent 0.044 against image 0.026 at the last "
        "step), and the denoiser's clean estimate at high noise, which decides the sCT, stays close to the latent "
        "L2's conditional mean, soft-tissue noise and all: on the abdomen test cases the 3D-WLDM sCT erred 35 HU in "
        "soft tissue against the regression U-Net's 24. Fidelity benchmark, 3D-WLDM, 350 + 1550 steps on the same "
        "seed-12345 VAE, 1 sample, 10 DDIM steps (test MAE HU, per case phantom / abdomen / abdomen / thin DICOM; "
        "bone Dice; diffusion validation HU at the last step): weight 1 / power 2 79.7 (134.9 / 50.5 / 50.8 / 82.6); "
        "0.078; 40.9. Weight 3 78.9 (133.4 / 49.6 / 49.8 / 82.9); 0.103; 39.6. Weight 10 77.6 (130.6 / 49.8 / 50.5 / "
        "79.7); 0.158 (0 / 0.307 / 0.324 / 0.001); 41.6. Weight 30 78.9 (130.4 / 52.1 / 53.0 / 80.2); 0.146; 43.4. "
        "Power 3 at weight 1 78.2 (133.7 / 48.7 / 49.0 / 81.3); 0.035; 39.3. Weight 10 + power 3 76.6 (130.3 / 47.3 "
        "/ 47.9 / 80.9); 0.126 (0 / 0.248 / 0.257 / 0); 38.3; SSIM 0.854 against 0.848. The bone weight (4) acts "
        "through the image loss, so a larger image weight gives more bone, and power 3, which alone took most of "
        "the bone away (recipe note diffusion_timestep_power_cpu), keeps most of it here. Seeds "
        "12345 / 1 / 2 (diffusion U-Net on the same VAE): 76.6 / 76.2 / 77.1 HU (76.6 +- 0.4) against 79.7 / 79.8 / "
        "81.1 (80.2 +- 0.8), bone Dice 0.126 / 0.148 / 0.157 against 0.078 / 0.112 / 0.078; the regression U-Net "
        "67.4 / 70.2 / 70.8, so 13.7 / 8.6 / 8.9 % behind it (was 18.3 / 13.6 / 14.6 %). The thin DICOM case still "
        "gets no bone. The ablation rows with the same settings (2026-12-06, seeds 12345 / 1 / 2 on the same VAEs): "
        "vanilla 76.3 / 77.5 / 77.3 (77.0 +- 0.6), + WRM 79.8 / 76.0 / 75.2 (77.0 +- 2.5), + WRM + SMD 74.9 / 74.6 / "
        "79.2 (76.2 +- 2.6), bone Dice 0.132 / 0.134 / 0.145 (3D-WLDM 0.144): within the seed spread of each other. "
        "Training time unchanged (the decoding is done at weight 1 too). The planner's GPU defaults stay 0 and 1: "
        "not measured at GPU length."),
    "diffusion_condition_scale": (
        "the MR latent conditions the denoiser as the VAE gives it times the CT latents' scale (its channels' means "
        "-0.13 to -1.19 and std 0.47 before scaling: about -8 and 3.2 after), kept (2026-12-02). Fidelity "
        "benchmark, 3D-WLDM, 350 + 1550 steps on the same VAE, seed 12345, timestep_power 2, 1 sample, 10 DDIM "
        "steps (test MAE HU, per case phantom / abdomen / abdomen / thin DICOM; diffusion validation HU; bone "
        "Dice): as it is 81.1 (135.0 / 53.7 / 53.4 / 82.5); 42.2; 0.044. Standardised per channel (mean 0, std 1, "
        "measured on the first training batches and stored with the model): 82.6 (132.4 / 56.4 / 55.7 / 86.1); "
        "47.8; 0.026, with the training loss higher at every epoch. Three times the scale (std about 10): 83.5 "
        "(137.8 / 57.9 / 56.3 / 81.9); 44.9; 0.004. Neither a weaker nor a stronger condition at the U-Net's stem "
        "helps, so its input scale is not what limits the denoiser (the code for both was not kept)."),
    "diffusion_unet_and_rate": (
        "cpu preset: diffusion U-Net [32, 64] at learning rate 1e-3 kept. Fidelity benchmark, same VAE, 1200 "
        "steps, seed 0, 10 DDIM steps (test MAE HU; bone Dice of the two abdomen cases): [32, 64] 88.9; 0.11 / "
        "0.10. A third level [32, 64, 128]: 86.1 (validation 54.0 against 56.0 HU); 0.05 / 0.02 (the phantom "
        "slab 0.004, the first bone there). Learning rate 2e-3: 86.8; 0.009 / 0.004. Both lower the MAE by "
        "about as much as one seed moves it and lose most of the little bone there was. Again after the encoder's "
        "edge padding (2026-12-02, shortcut off, seed 12345): [32, 64, 128] 87.1 against 85.5 HU (validation 42.7 "
        "against 45.1 HU)."),
    "vae_downsampling": (
        "cpu preset: 2x downsampling ([16, 32], 8 latent channels). At 3 mm voxels a linear 4x average-and-"
        "upsample already loses 56.5 HU (2x: 30.5 HU); a CT-only autoencoder reached 38.8 HU validation MAE after "
        "400 steps at 2x against 71.4 HU (4x, 8 channels) and 65.1 HU (4x, 16 channels). The joint MR/CT VAE with "
        "SMD reached 26.0 HU after 1000 steps at 2x (16 latent channels: 32.8 HU). The latent voxel is then 6 mm, "
        "as it is for 4x at 1.5 mm. A 1x latent (vae.channels [16], diffusion U-Net [16, 32, 64]; 2026-12-02, same "
        "budget and seed, after the encoder's edge padding): first-stage ceiling 43.7 against 58.5 HU, diffusion "
        "validation 37.5 against 45.1 HU, but the test sCT 87.5 against 85.5 HU (phantom slab 158.5 against 143.9, "
        "abdomen 53.7 / 51.4 against 55.3 / 56.0, thin DICOM 86.4 against 87.0), 976 s of training against 501 "
        "and 76 s per test case against 18 s (8x the latent voxels)."),
    "vae_shortcut_cpu": (
        "cpu preset: vae.shortcut 4 with diffusion.center_latents (2026-12-02). Fidelity benchmark, 3D-WLDM, 700 VAE "
        "+ 1200 diffusion steps, seed 12345, 1 sample, 10 DDIM steps, every case encoded edge-padded (first-stage "
        "ceiling / test sCT MAE HU, per case phantom / abdomen / abdomen / thin DICOM, bone Dice): off 58.5 / 85.5 "
        "(143.9 / 55.3 / 56.0 / 87.0), 0.000 on every case; 4 + centred 30.7 / 85.7 (140.3 / 57.0 / 56.8 / 88.7), "
        "0.071 (0.023 / 0.117 / 0.145 / 0.000), SSIM 0.837 against 0.833; 8 (lossless) + centred 17.9 / 87.9 (144.0 "
        "/ 57.7 / 58.1 / 91.7), 0.080 (0.000 / 0.159 / 0.161 / 0.000). Width 4 meets the first-stage goal (<= 40 HU) "
        "and gives bone on three of the four cases at the same MAE. Before the edge padding the thin DICOM case lost "
        "17-39 HU with any shortcut (recipe note vae_shortcut), which is why it was off."),
    "bone_weight_cpu": (
        "cpu preset: regression.bone_weight 4 and diffusion.bone_weight 4 (2026-12-02; the planner's defaults stay "
        "0, not measured at GPU length): voxels whose true CT is above 250 HU count 5x in the regression U-Net's L1 "
        "and in the diffusion image loss. Bone is 2-7 % of a body here; under a plain L1 a voxel whose MR could be "
        "bone or soft tissue gets the more frequent soft tissue (the L1's optimum is the median), so the sCTs had "
        "next to no voxel above 250 HU (regression: none on three test cases, 0.04 % of the body on the fourth; "
        "the true CTs 1.8-7.4 %). Fidelity benchmark, seed 12345, 1900 steps (regression) "
        "or 350 + 1550 on the same VAE (3D-WLDM), 1 sample, 10 DDIM steps (test MAE HU, per case phantom / abdomen "
        "/ abdomen / thin DICOM; bone Dice per case; SSIM): regression weight 0 69.6 (140.6 / 36.6 / 36.6 / 64.6); "
        "0.003 (0 / 0 / 0.011 / 0); 0.867. Weight 4 67.4 (133.6 / 37.3 / 36.4 / 62.1); 0.146 (0 / 0.236 / 0.303 / "
        "0.043); 0.874. Weight 9 70.1 (131.8 / 40.7 / 40.3 / 67.7); 0.185 (0 / 0.279 / 0.335 / 0.127); 0.870. "
        "3D-WLDM weight 0 79.4 (134.3 / 50.5 / 50.3 / 82.5); 0.012 (0 / 0.025 / 0.025 / 0); 0.849. Weight 4 79.7 "
        "(134.9 / 50.5 / 50.8 / 82.6); 0.078 (0 / 0.146 / 0.166 / 0); 0.848. Weight 9 83.5 (137.7 / 54.6 / 54.5 / "
        "87.0); 0.102 (0 / 0.203 / 0.206 / 0); 0.843. 4 for both: the regression U-Net gains bone AND MAE, 3D-WLDM "
        "6x its bone Dice for 0.3 HU; 9 costs 2.7-4.1 HU more. Seeds 12345 / 1 / 2 (the 3D-WLDM diffusion U-Net on "
        "the same VAE): regression weight 0 69.6 / 69.3 / 75.6, weight 4 67.4 / 70.2 / 70.8 HU (bone Dice 0.001 "
        "against 0.111 on average); 3D-WLDM weight 0 79.4 / 78.8 / 80.3, weight 4 79.7 / 79.8 / 81.1 HU (bone "
        "Dice 0.036 against 0.089). No weight gives bone on the phantom's test slab: "
        "its training slab holds 0.7 % bone against the test slab's 7.4 % (the bone lies at one end of the "
        "phantom), so no real training case shows what the phantom's bone looks like in its MR."),
}

# Why the registration defaults (RegistrationPlan) are what they are: measured with bench/registration.py
# (issue 19: a real CT on a 512x512x149 grid warped by a known rigid + B-spline map, an MR simulated from it
# on 333x333x67 at 1.5x1.5x5 mm; MAE in HU inside the body against the truth; seed 0; 2-core CPU shared
# with a model training, so seconds are noisy: compare only runs of one line, made back to back).
REGISTRATION_NOTES: dict[str, str] = {
    "orientation_spacing_mm": (
        "the orientation search runs at 8 mm, 1 resolution, 64 rigid iterations per candidate "
        "(orientation_resolutions, orientation_iterations): 0.4-0.9 s for all four candidates on the whole-body-"
        "sized case (3.8 s at the former 4 mm, 2 resolutions, 128 iterations); the identity still wins "
        "there by a wide metric gap (-0.78 against -0.45 for the best rotation) and the porcine phantom still "
        "starts from rot180_y (bench/preprocess.py)"),
    "pyramid": (
        "recursive pyramids (coarse levels downsampled) instead of elastix's smoothing pyramids (every level at "
        "the working spacing), with the fixed MR cropped to its body box + body_margin_mm (30 mm; the known-"
        "deformation MR's 2 mm grid 250x250x168 -> 222x176x168): with the cheap orientation search, 127.9 s and "
        "33.1 HU MAE against 135.3 s and 35.6 HU for the former plan, plain default elastix (20 mm grid) "
        "130.7 s and 36.3 HU"),
    "resolutions": (
        "rigid: 3 levels cost under 2 s in all (kept); B-spline: each level costs 10-35 s on the whole-body-"
        "sized case, and 2 levels (40 and 20 mm grids) beat 3 (80, 40, 20 mm) in time and accuracy: 71.6 s, "
        "24.8 HU against 127.9 s, 33.1 HU (4096 samples)"),
    "spatial_samples": (
        "2048 random samples per iteration (elastix's default) rather than 4096: with 2 B-spline levels 41.1 s "
        "and 25.7 HU against 71.6 s and 24.8 HU - the B-spline time halves for 0.9 HU"),
}
