"""Tests of loopmoe.evaluation, and what the compare tests share of them."""


def record_measurements(monkeypatch) -> list[str]:
    """The names of the stored measurements ``evaluate_run`` computes (not reuses) from now on, in order."""
    from loopmoe.evaluation import pipeline

    measured: list[str] = []
    real = pipeline.cached

    def spy(path, params, compute):
        def counted():
            measured.append(path.name)
            return compute()

        return real(path, params, counted)

    monkeypatch.setattr(pipeline, "cached", spy)
    return measured
