"""xdplb benchmarks: data-plane cost, lab throughput, controller cost.

Run them with ``tools/bench/run.py`` (see its --help or the README's
"Performance" section). Each suite prints a table, writes JSON and draws PNG
charts. Benchmarks report figures and ratios; they never pass or fail on
speed. Modules with one job each:

  stats.py, parse.py, frames.py, tables.py  pure helpers (unit-tested)
  context.py                                 what every figure is measured on
  charts.py                                  matplotlib PNGs (Agg backend)
  suite_dataplane.py                         BPF_PROG_TEST_RUN per-packet cost
  suite_lab.py, lab_baselines.py             namespace-lab throughput and connection rate
  suite_controller.py                        Maglev, verdict-to-live, attach, reload, memory
  run.py                                     the command line
"""
