# make demo: install into .venv, train on the synthetic demo set, segment a demo image.
# make test: install into .venv and run the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_RUN := runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: demo test

$(VENV)/installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

demo: $(VENV)/installed
	$(PY) dataset.py --write_demo demo_data
	$(PY) train.py --epochs 15 --augment 0 --class_weights none --output_dir $(DEMO_RUN)
	$(PY) test.py --test_image_path demo_data/val/images/0000.png --mask_path demo_data/val/masks/0000.png \
		--model_path $(DEMO_RUN)/best.pt --output_dir $(DEMO_RUN)/predictions
	@echo
	@echo "checkpoints: $(DEMO_RUN)/epoch_NNN.pt, $(DEMO_RUN)/last.pt, $(DEMO_RUN)/best.pt"
	@echo "loss plot:   $(DEMO_RUN)/loss_plot.png   metrics: $(DEMO_RUN)/metrics.csv"
	@echo "segmentation: $(DEMO_RUN)/predictions/0000_figure.png"

test: $(VENV)/installed
	$(PY) -m pytest -q tests
