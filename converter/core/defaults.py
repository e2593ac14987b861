"""User-visible defaults and choices, in one place: the Python API, the CLI (which imports
this module without loading onnx, numpy or torch) and recipes all read them from here."""

# --- export: opset 18 is the dynamo exporter's own default in torch 2.13, written natively by
# both exporters and run by every onnxruntime since 1.14.
DEFAULT_OPSET = 18
EXPORTERS = ("auto", "dynamo", "torchscript")
EXPORT_ATOL = 1e-4
EXPORT_RTOL = 1e-3

# --- prune
PRUNE_SCOPES = ("global", "layer")
DEFAULT_PRUNE_SCOPE = "global"  # measured on the trained digits models: beats per-layer
DEFAULT_MIN_PARAMS = 1024  # smaller tensors (biases of small layers, norms) are left whole

# --- quantize
CALIB_METHODS = ("minmax", "entropy", "percentile", "distribution", "mean_minmax", "mse")
WEIGHT_ROUNDINGS = ("nearest", "gptq")  # static int8 weights (see passes/gptq.py)
# where static Q/DQ goes (see passes/quantize.py)
QUANT_SCHEMES = ("auto", "default", "transformer")
QUANT_FORMATS = ("qdq", "qoperator")
QUANT_TYPES = ("uint8", "int8")
DEFAULT_CALIB_BATCH = 16

# --- validate, and the budgets of auto and the gates of run
METRICS = ("accuracy", "agreement", "cosine", "max-abs", "mean-abs")
SCORES = ("accuracy", "agreement", "cosine")  # higher is better; max-abs/mean-abs are errors
DEFAULT_VALIDATE_BATCH = 64
DEFAULT_BASELINE_TOLERANCE = 0.005

# --- bench
DEFAULT_WARMUP = 10
DEFAULT_RUNS = 100

# --- sensitivity
SENSITIVITY_MODES = ("static", "dynamic")
DEFAULT_SENSITIVITY_SAMPLES = 64
DEFAULT_SENSITIVITY_BATCH = 32

# --- per-tensor error (converter/check/node_error.py), in sensitivity and auto's report
NODE_ERROR_SAMPLES = 8  # one run of each model per sample (batch 1): memory stays one sample's
NODE_ERROR_ROWS = 10  # worst tensors shown; the JSON and the manifest have all

# --- kernel truth (converter/check/kernel_truth.py): a QDQ model run both ways
KERNEL_TRUTH_SAMPLES = 8  # one run each way per sample: cheap enough for every quantize
KERNEL_TRUTH_THRESHOLD = 0.01  # mean cosine the kernels may differ from the QDQ semantics
KERNEL_TRUTH_PARTS = 3  # nodes named where the tensors part
VALIDATE_KERNEL_SAMPLES = 256  # validate and auto score a QDQ model both ways on these

# --- auto
AUTO_MAX_EXCLUDED = 8
AUTO_BENCH_RUNS = 50
AUTO_TIME_BUDGET = None  # seconds of wall time for the search; None: no limit

# A model that quantizes activations at run time (dynamic int8) takes each run's range from
# the samples in that run, so its outputs depend on what else is in the batch (measured on
# one dynamic model, 200 samples: mean cosine 0.9993 at batch 1, 0.9912 at 64, 0.9859 at 200).
# It is scored at the batch it is deployed at, the batch bench times: 1. Other models batch
# freely (DEFAULT_VALIDATE_BATCH): their outputs do not depend on the batch.
DEPLOYMENT_BATCH = 1
