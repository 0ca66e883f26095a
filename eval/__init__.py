"""Evaluation harness: prompt sets, generation for FID/CLIP, FID/KID, CLIP score, preference metrics, reports.

Consumes exported artifacts only (a teacher folder, or a student LoRA + stepdistill.json through `pipelines`);
never imports stepdistill.train.
"""
