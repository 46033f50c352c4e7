"""The pages people read: the data-quality summary and the evaluation report (Jinja2 templates, Matplotlib plots)."""
