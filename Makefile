# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The demo: the small-data preset (tiny YOLOv2 from scratch, AdamW: yolo/config.py SMALL_DATA) on
# the generated demo set (data/demo), shortened to a dozen epochs at 224 for a 2-core CPU.
DEMO_TRAIN := --preset small --demo --run demo --epochs 12 --img-size 224 --eval-img-size 224 \
	--burn-in 50 --lr-steps 8 10 --eval-every 2 --workers 2

.PHONY: venv demo test lint format bench clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# A fresh run each time: the demo's own run folders are replaced, nothing else is touched.
demo: $(STAMP)
	rm -rf model/demo logs/demo
	$(BIN)/python train_yolov2.py $(DEMO_TRAIN)
	$(BIN)/python test_yolov2.py --demo --weights model/demo/best.pt --out model/demo --workers 2

test: lint
	$(BIN)/python -m pytest -q

# Every CPU benchmark (bench/gpu_check.py is `make gpu-check`; bench/common.py is their helpers).
BENCHES := $(filter-out bench/common.py bench/gpu_check.py,$(wildcard bench/*.py))

bench: $(STAMP)
	for script in $(BENCHES); do $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# The CUDA path on one GPU in about 8 minutes (tests, speed, resume, torchrun + NCCL): writes
# bench/results/gpu.{md,json}; without CUDA a quick smoke run. Run it on any CUDA machine; without
# network, install from wheels fetched elsewhere with `pip download` (bench/gpu_check.py's
# docstring gives the commands).
.PHONY: gpu-check
gpu-check: $(STAMP)
	PYTHONUNBUFFERED=1 $(BIN)/python bench/gpu_check.py
