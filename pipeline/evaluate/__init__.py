"""Evaluation and forecasts: metrics, climatology, rollouts, plots, report, predict."""
