"""The Ray layer the jobs share: CLI, session, placement, progress, resume, tables, and the label job."""
