"""Evaluating generated digits: a project-trained MNIST classifier and metrics over its outputs."""
