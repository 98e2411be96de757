"""Using a trained model: loading, evaluate, predict, metrics, threshold, report, plots."""
