"""EHR data pipeline: raw MIMIC-III / MIMIC-IV / eICU tables → patients, samples, vocabularies, prompts.

Modules: records (Visit, Patient), dataset (Sample, Vocab, PreparedData), tables (CSV access, drop
counts), mappings (NDC→ATC-3, ATC names, DDI graph), mimic / eicu (readers → RawCohort in cohort),
build (top-k, protocols, splits, stats), report, prompts, synthetic, prepare (CLI). See docs/data.md.
"""
