# napari-mupad developer commands. See README.md.
.PHONY: setup test demo bench help

# extra pytest arguments, e.g. make test ARGS="-x -q tests/test_plugin_manifest.py"
ARGS ?=

help:
	@echo "make setup  - create .venv and install napari-mupad (pinned CPU torch first)"
	@echo "make test   - Xvfb/Qt system packages (apt), venv, then the whole test suite under Xvfb"
	@echo "make demo   - venv, then the bundled demo models over the bundled slide -> demo-out/ (+ napari)"
	@echo "make bench  - run the benchmarks (if any)"

setup:
	bash scripts/setup.sh

test:
	bash scripts/test.sh $(ARGS)

demo:
	bash scripts/setup.sh
	.venv/bin/mupad demo --out demo-out

bench:
	bash scripts/setup.sh
	@if ls benchmarks/*.py >/dev/null 2>&1; then \
		for f in benchmarks/*.py; do echo "== $$f"; .venv/bin/python "$$f" || exit 1; done; \
	else echo "no benchmarks yet (benchmarks/*.py)"; fi
