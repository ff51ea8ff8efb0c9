"""load_tests/report.py (`make report`) without a server: its ports and its plot (load_tests/ is on
pytest's pythonpath)."""

from __future__ import annotations


def test_report_takes_its_ports_from_the_environment_or_options(monkeypatch) -> None:
    """`make report INFERENCE_PORT=...` (make hands command-line variables to the recipe's environment) or
    ``--<api>-port``; the ports not given are free ones, not 8080-8082 (which `make serve` may hold)."""
    import report

    for variable in ("INFERENCE_PORT", "MANAGEMENT_PORT", "METRICS_PORT"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("INFERENCE_PORT", "18080")
    ports = report.report_ports(report.parse_args(["--metrics-port", "18082"]))
    assert ports["inference"] == 18080 and ports["metrics"] == 18082
    assert ports["management"] not in (0, 8081)


def test_report_plot_keeps_its_whole_title_and_tells_every_handler_apart() -> None:
    """The machine description in the title is wrapped, not cut ("TorchS"), and stays inside the figure;
    batching off / on / stock each have their own colour and marker."""
    import matplotlib.pyplot as plt
    import report

    machine = ("AMD EPYC 9654 96-Core Processor, 2 logical CPUs, 23 GiB RAM, no GPU; Linux 6.8.0, Python 3.11.2, "
               "torch 2.14.1, TorchServe 0.12.0")  # fmt: skip
    cells = []
    for model in (report.OURS_OFF, report.OURS_ON, report.STOCK):
        for endpoint in ("predictions", "explanations"):
            for users in (1, 4):
                cells.append(report.Cell(model, endpoint, users, latencies=[10.0 * users, 12.0], elapsed=1.0))
    figure = report.figure_of(cells, [1, 4], machine)
    try:
        figure.canvas.draw()
        from matplotlib.text import Text

        title = next(t for t in figure.findobj(Text) if t.get_text() and t.get_text() == figure.get_suptitle())
        assert "TorchServe 0.12.0" in title.get_text().replace("\n", " ")
        box, width, height = title.get_window_extent(), *figure.canvas.get_width_height()
        assert 0 <= box.x0 and box.x1 <= width and box.y1 <= height, (box, width, height)
        styles: dict[str, set] = {}
        for line in figure.axes[0].get_lines():
            model = next(m for m, name in report.LABELS.items() if line.get_label().startswith(name))
            styles.setdefault(model, set()).add((line.get_color(), line.get_marker()))
        assert all(len(s) == 1 for s in styles.values()), styles  # one look per handler, both endpoints
        looks = [next(iter(s)) for s in styles.values()]
        assert len(looks) == 3 and len({c for c, _ in looks}) == 3 and len({m for _, m in looks}) == 3, looks
    finally:
        plt.close(figure)
