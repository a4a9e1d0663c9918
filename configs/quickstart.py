"""Quickstart: 2D SAU-Net with inverse distance targets and focal-consistency SSL on
embedded synthetic fluorescence cells (no download). About 3 minutes on 2 CPU cores.

    python launch.py --config=configs/quickstart.py --workdir=/tmp/cellcount_quickstart

Expected (seed 0, 2-core CPU): see the README's quickstart table.

`configs/quickstart.py:tiny` shrinks it to seconds (a 4-feature network on 32x32 images,
4 steps), for tests and for trying a launch setup such as several processes:

    python launch.py --config=configs/quickstart.py:tiny --workdir=/tmp/tiny
"""
import ml_collections


def get_config(arg: str = ""):
    if arg not in ("", "tiny"):
        raise ValueError(f"quickstart variants: '' or 'tiny', got {arg!r}")
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.features = 16           # 32 in the paper; 16 keeps the CPU quickstart short
    c.model.dropout = 0.3           # attention dropout while training
    c.model.dtype = "auto"          # 2D: bfloat16 convolutions on a CPU with bf16 units
                                    # (AMX-BF16, AVX512-BF16), else float32; 3D: float32;
                                    # 'float32' or 'bfloat16' to fix it (bfloat16: float32
                                    # params, optimizer, norms and loss)
    c.model.impl = "auto"           # convolution formulation: 'cpu' on CPU, 'xla' on GPU/TPU

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"
    c.data.seed = 0
    c.data.shape = (128, 128)
    c.data.spacing = (1.0, 1.0)     # physical size of a pixel per axis
    c.data.channels = 3
    c.data.num_cells = (30, 90)
    c.data.radius = 4.0
    c.data.num_labeled = 8
    c.data.num_unlabeled = 32
    c.data.num_test = 16
    c.data.normalise = "channel_stats"  # 'minmax' (+ per-crop standardisation, 3D recipe) or
                                        # 'percentile' (per image, robust to exposure)
    c.data.percentiles = (1.0, 99.8)    # 'percentile' only: mapped to 0 and 1
    # source 'vgg': the VGG cells folder and the paper's split seed
    c.data.path = "../shared/data/vgg_cells"
    c.data.split_seed = 5455
    # source 'folder': images, annotations (<stem>.csv dots or <stem>.tif label masks)
    c.data.ndim = 2
    c.data.images = ""
    c.data.annotations = ""
    c.data.test_names = ()           # stems held out from `images` for testing, or:
    c.data.test_images = ""          # a separate test folder
    c.data.test_annotations = ""
    c.data.roi = ""                  # regions of interest of partly dotted images: a folder of
    c.data.test_roi = ""             # <stem>.csv boxes (y0,x0,y1,x1) or <stem>.tif masks
    c.data.holdout = 0.0             # > 0: this fraction of each labeled image (a band) is left
                                     # out of the supervised loss to calibrate the detector on
    c.data.holdout_min_dots = 0      # bands with fewer dots: calibrate on the whole images
    c.data.shard_unlabeled = False   # True: row j of the unlabeled batch draws only images i
                                     # with i % train.unlabeled_batch == j, so each of N
                                     # processes reads 1/N of the unlabeled pool

    # Intensity augmentation of every training crop, in units of the crop's own spread
    # (data.dataset.intensity_augment); 0 leaves a change out.
    c.augment = ml_collections.ConfigDict()
    c.augment.brightness = 0.0      # shift of up to +-this many standard deviations
    c.augment.contrast = 0.0        # contrast factor in [1 - c, 1 + c]
    c.augment.gamma = 0.0           # gamma in [1 / (1 + g), 1 + g]
    c.augment.noise = 0.0           # Gaussian noise of up to this many standard deviations
    c.augment.field = 0.0           # each cell's brightness: a smooth field exp(field * g) on
                                    # the signal, g a unit Gaussian random field
    c.augment.field_sigma = 0.0     # its smoothness, physical units (0: half the median
                                    # nearest-dot distance)

    c.target = ml_collections.ConfigDict()
    c.target.kind = "inverse_distance"   # or 'gaussian'
    c.target.scale = 100.0               # reference: 100 for VGG, 1 for light-sheet 3D
    c.target.cutoff = 0.0
    c.target.sigma = 2.0                 # gaussian only, physical units

    c.loss = ml_collections.ConfigDict()
    c.loss.supervised = "mse"            # or 'peak_weighted_mse' (losses.peak_weighted_mse)
    c.loss.supervised_options = ml_collections.ConfigDict()  # keyword arguments of that loss
    c.loss.consistency = "focal_consistency"
    c.loss.consistency_options = ml_collections.ConfigDict({"peaks": "reference", "threshold": 0.0})

    c.ssl = ml_collections.ConfigDict()
    c.ssl.enabled = True
    c.ssl.noise_rate = 1.0          # u ~ U(1 - r, 1 + r); reference r = 1
    c.ssl.noise_at = "all"          # 'all' (reference code) or 'bottleneck' (paper text)
    c.ssl.weight = 1.0              # the consistency weight after the ramp (reference: 1)
    c.ssl.ramp_steps = 150
    c.ssl.ramp_shape = "exp"
    c.ssl.ema_decay = 0.0           # 0: the teacher is the current parameters (paper)
    c.ssl.student_intensity = 0.0   # > 0: the student's unlabeled crops get contrast, shift and
                                    # noise of this strength (perturb.intensity); the teacher's not
    c.ssl.feature_dropout = 0.0     # > 0: channel dropout of the student's unlabeled features
                                    # (perturb.feature_dropout, where ssl.noise_at says)

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adam"           # or 'adamw' (reference: weight_decay 1.0 = lr_t decay)
    c.optim.lr = 1e-3
    c.optim.schedule = "cosine"     # or 'sgdr' (reference: first period 50, doubling)
    c.optim.alpha = 0.0
    c.optim.weight_decay = 1.0
    c.optim.sgdr_period = 50
    c.optim.sgdr_mult = 2

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1500
    c.train.minutes = 0.0           # > 0: steps, SGDR periods and ramp fitted to this many
                                    # minutes from the step rate measured after compiling
    c.train.crop = (64, 64)
    c.train.batch = 4               # labeled crops per step (global, over all devices)
    c.train.unlabeled_batch = 4
    c.train.dot_fraction = 0.0      # probability that a labeled crop is drawn around a dot
                                    # (sparse volumes: a few nuclei in every step)
    c.train.parallel = "pmap"       # or 'shard_map'
    c.train.log_every = 100         # metrics.jsonl, TensorBoard and a progress line
    c.train.checkpoint_every = 500

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 0                # > 0: every this many steps, calibrate (records
                                    # calibration_f1) and score the test images (records); the
                                    # step that calibrates best is the one prediction uses
    c.eval.radius = 5.0             # headline match radius, physical units
    c.eval.extra_radii = (3.0, 8.0)
    c.eval.detector = "auto"        # 'components', 'peaks' (local maxima), or 'auto': the
                                    # better of the two on the labeled training images
    c.eval.min_size = 1
    c.eval.max_detections_ratio = 2.0  # calibration refuses thresholds that detect more than
                                    # this many times the calibration images' dots
    c.eval.min_distance_fractions = (0.0, 0.5, 1.0)  # 'peaks': minimum distance between peaks
                                    # tried in calibration, in units of eval.radius (0: the
                                    # 3^ndim neighbours only)
    c.eval.split_ratios = (0.0,)    # calibration tries each: a detection holding more than this
                                    # many times the typical detection's mass is split in two
                                    # (postprocess.split_heavy; 0: never)
    c.eval.threshold_fractions = tuple(float(f) for f in [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35,
                                                          0.4, 0.45, 0.5, 0.6, 0.7, 0.8])

    c.predict = ml_collections.ConfigDict()
    c.predict.tile = ()             # voxels per axis that a tile owns; (): 4 training crops, or
                                    # fewer where the window would exceed 2^25 / features voxels
    c.predict.context = ()          # voxels of context on each side; (): half a training crop
    c.predict.tta = False           # test-time augmentation: each window's density is the mean
                                    # over its flips (2D: 8 passes; 3D: 16), in calibration too
    c.predict.zooms = (1.0,)        # input zooms that calibration chooses from (with the
                                    # threshold, on the labeled images): the network sees each
                                    # window resampled by the zoom, its density resampled back
    if arg == "tiny":
        c.model.dtype = "float32"   # what the tests compare against
        c.model.features = 4
        c.data.shape = (32, 32)
        c.data.num_cells = (4, 8)
        c.data.radius = 3.0
        c.data.num_labeled, c.data.num_unlabeled, c.data.num_test = 2, 2, 2
        c.train.crop = (16, 16)
        c.train.batch, c.train.unlabeled_batch = 2, 2
        c.train.steps, c.train.checkpoint_every, c.train.log_every = 4, 2, 2
    return c
