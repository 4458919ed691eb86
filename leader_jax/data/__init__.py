"""EHR data pipeline: raw MIMIC-III / MIMIC-IV / eICU tables → patients, samples, vocabularies, prompts."""
