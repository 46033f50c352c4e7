"""The pages people read: the data-quality summary (markdown) and the evaluation report (HTML from the
Jinja2 templates in templates/), with their Matplotlib plots and OpenCV thumbnails."""
