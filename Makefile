# Two commands set everything up on a fresh machine: `make smoke` and `make verify`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch goes in first, so that no dependency pulls a CUDA build.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,vlm,lora,data,rich
PYTEST_WORKERS ?= 2

.PHONY: install verify verify-dist verify-deep test smoke soak gpu-check rehearse clean

install: $(VENV)/.installed-$(EXTRAS)

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[$(EXTRAS)]"
	touch $@

# The whole suite (derandomized hypothesis), then the verification report in reports/. The
# data-parallel tests run apart (verify-dist), to keep this one within 10 minutes on 2 cores.
DIST_TESTS := tests/test_distributed_*.py
verify: install
	@rm -rf reports/fragments; mkdir -p reports
	HYPOTHESIS_PROFILE=$${HYPOTHESIS_PROFILE:-ci} $(PY) -m pytest -q -n $(PYTEST_WORKERS) \
		--ignore-glob='$(DIST_TESTS)' --junitxml=reports/junit.xml; status=$$?; \
	$(PY) -m grpo_harness.report reports/junit.xml --out reports; rm -rf reports/fragments; exit $$status

# The data-parallel tests: 2 gloo ranks per run (torch.multiprocessing, torchrun), each at one
# torch thread; a few minutes on 2 cores. CI (.ci/run) runs them after verify.
verify-dist: install
	HYPOTHESIS_PROFILE=$${HYPOTHESIS_PROFILE:-ci} $(PY) -m pytest -q -n $(PYTEST_WORKERS) $(DIST_TESTS)

# Same suite with many more hypothesis examples per property.
verify-deep:
	$(MAKE) verify HYPOTHESIS_PROFILE=deep

# Fast tests only (skips the end-to-end ones marked slow).
test: install
	HYPOTHESIS_PROFILE=$${HYPOTHESIS_PROFILE:-dev} $(PY) -m pytest -q -n $(PYTEST_WORKERS) -m "not slow"

# Train CartPole-v1 on the default config.
smoke: install
	$(PY) -m grpo_harness.cli train cartpole --out runs/smoke-$$(date +%Y%m%d-%H%M%S)

# Not in CI: CartPole for SOAK_MINUTES with SIGKILL/SIGTERM every 5-40 s and a resume after each,
# compared with an uninterrupted run (benchmarks/soak.py; figures in benchmarks/RESULTS.md).
SOAK_MINUTES ?= 10
soak: install
	$(PY) benchmarks/soak.py --minutes $(SOAK_MINUTES)

# Not in CI: mutation testing of the GRPO math (mutmut 3, tests/mutation/run.py): prints the score
# of each file, writes reports/mutation-<suite>.md, fails below tests/mutation/score.json.
# MUTATE_ARGS="--suite loop" mutates loop.py and refmodel.py with the loop tests instead.
MUTATE_ARGS ?=
.PHONY: mutate
mutate: install
	$(PY) -c "import mutmut" 2>/dev/null || $(PY) -m pip install -q --disable-pip-version-check -e ".[mutate]"
	$(PY) tests/mutation/run.py $(MUTATE_ARGS)

# On a CUDA machine: a random-init 2B Qwen2-VL, preflight in bf16, 20 iterations; step time,
# tokens/s, peak memory and the log-prob gap to benchmarks/results/gpu.json and RESULTS.md.
# Without CUDA: one line saying so (exit 0).
gpu-check: install
	$(PY) -m grpo_harness.cli gpu-check

# The README's GPU and scale-out commands run as written on CPU (the tiny model, 2 ranks, 2
# iterations), each checked to move the weights as a float32 run does, and a 2-node torchrun
# launch on localhost against one process (benchmarks/rehearse.py). A few minutes; CI runs it.
rehearse: install
	$(PY) benchmarks/rehearse.py

clean:
	rm -rf $(VENV) reports runs .pytest_cache .hypothesis
