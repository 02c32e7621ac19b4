# halfbody developer entry points. `make install` then `make test` on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test test-slow test-all train learning-check learning-check-mirrorme learning-check-audio2pose curriculum-check bench-data bench-oracle bench-phd bench-dit bench-generate bench-paper bench-world bench-pipeline official-parity table2-cpu clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel

install: $(PY)  ## create .venv and install halfbody (editable) with its test tools
	$(PY) -m pip install -e ".[dev]"

# pytest-xdist processes for `make test`: one per core (most tests are single-threaded; each worker uses one thread)
TEST_WORKERS ?= 2

test:  ## the fast suite (CI runs exactly this; at most 5 minutes on 2 cores)
	WANDB_MODE=disabled $(PY) -m pytest -m "not slow" -q -n $(TEST_WORKERS) --dist loadfile

test-slow:  ## the longer checks only
	WANDB_MODE=disabled $(PY) -m pytest -m slow -q

test-all:
	WANDB_MODE=disabled $(PY) -m pytest -q

train:  ## the default run: tiny EchoMimicV2 on the synthetic world, CPU
	$(PY) -m halfbody.train

learning-check:  ## 45 min CPU + scoring: does the tiny preset learn audio-driven mouth sync? (benchmarks/RESULTS.md)
	$(PY) benchmarks/learning_check.py

learning-check-mirrorme:  ## the same check for the tiny MirrorMe DiT
	$(PY) benchmarks/learning_check.py --experiment learning_check_mirrorme

learning-check-audio2pose:  ## <= 30 min CPU: does the tiny audio-to-pose model learn beat gestures? (benchmarks/RESULTS.md)
	$(PY) benchmarks/audio2pose_learning_check.py

bench-data:  ## data-loading throughput (samples/s, 2 workers)
	$(PY) benchmarks/data_loading.py

bench-oracle:  ## oracle-metric reference points (ground truth, static, noise) on the validation windows
	$(PY) benchmarks/oracle_calibration.py

bench-phd:  ## cost of the PhD loss terms per training step (ratio vs the latent loss alone)
	$(PY) benchmarks/phd_decode_cost.py

curriculum-check:  ## apdh_full on CPU (30 steps per phase), then where audio acts (lips / head / global)
	$(PY) -m halfbody.train experiment=apdh_full preset=tiny_cpu callbacks.curriculum.max_steps_per_phase=30 trainer.val_check_interval=30 trainer.limit_val_batches=0 logger=csv hydra.run.dir=logs/apdh_full_cpu
	$(PY) benchmarks/audio_locality.py logs/apdh_full_cpu

bench-generate:  ## generation frames per second, both families (tiny on CPU; ARGS="--size paper --dtype bf16" on a GPU)
	WANDB_MODE=disabled $(PY) benchmarks/generation_fps.py $(ARGS)

bench-paper:  ## one GPU, <= 8 min: training step time / MFU / memory (measured vs predicted) and generation FPS at paper shapes
	$(PY) benchmarks/paper_scale_speed.py --size paper $(ARGS)

bench-dit:  ## alias: the MirrorMe rows of bench-generate
	WANDB_MODE=disabled $(PY) benchmarks/generation_fps.py --family mirrorme $(ARGS)

bench-world:  ## synthetic world generation speed
	$(PY) benchmarks/synthetic_world_speed.py

bench-pipeline:  ## video_to_shards speed without the pose model (clips per minute per core)
	$(PY) benchmarks/video_to_shards_speed.py --videos data/bench_pipeline_videos

official-parity:  ## ~3 min CPU: our EchoMimicV2 vs the official code on the same random weights (OFFICIAL=<checkout>)
	@test -n "$(OFFICIAL)" || { echo "error: OFFICIAL is not set: make official-parity OFFICIAL=<a checkout of antgroup/echomimic_v2>" >&2; exit 2; }
	WANDB_MODE=disabled $(PY) benchmarks/official_parity.py --official "$(OFFICIAL)" $(ARGS)

# EchoMimicV2 Table 2 on CPU: 12 rows x (7 phases x TABLE2_STEPS steps of the tiny preset), each generating and
# scoring TABLE2_CLIPS held-out synthetic clips (benchmarks/RESULTS.md). Re-running skips finished rows. One torch
# thread per process: tiny models gain little from a second one, and on a busy machine two spin-waiting threads
# made a row ~5x slower.
TABLE2_STEPS ?= 8
TABLE2_CLIPS ?= 4
TABLE2_SAMPLING_STEPS ?= 10
TABLE2_THREADS ?= 1
table2-cpu:  ## <= 45 min CPU: the whole EchoMimicV2 Table 2 with tiny models -> logs/ablate/echomimic_v2_table2_cpu/table.md
	OMP_NUM_THREADS=$(TABLE2_THREADS) $(PY) -m halfbody.ablate table=echomimic_v2_table2 train_preset=tiny_cpu output_dir=logs/ablate/echomimic_v2_table2_cpu \
		'train_overrides=["callbacks.curriculum.max_steps_per_phase=$(TABLE2_STEPS)","trainer.val_check_interval=$(TABLE2_STEPS)","trainer.limit_val_batches=0","logger=csv"]' \
		'generate_overrides=["steps=$(TABLE2_SAMPLING_STEPS)"]' 'evaluate_overrides=["protocol.resolution=64"]' \
		test_set.max_clips=$(TABLE2_CLIPS) $(ARGS)

clean:
	rm -rf logs multirun outputs .pytest_cache
