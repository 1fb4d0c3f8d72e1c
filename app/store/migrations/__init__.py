"""The Alembic environment of gpuq's database: env.py, the template, versions/."""

# The newest revision in versions/. make_engine compares the database against it without
# loading Alembic (a quarter second of every command's start-up); a test holds it equal to
# the head Alembic finds, so a new revision must move it.
HEAD_REVISION = "0013"
