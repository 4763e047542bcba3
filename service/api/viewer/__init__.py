"""The browser viewer's static files (``static/``): the page and the vendored NiiVue."""
