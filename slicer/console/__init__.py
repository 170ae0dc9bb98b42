"""The web console (``/ui``): one page of HTML, JavaScript and CSS served by the daemon itself,
with xterm.js for terminals; every asset comes from this package (``assets.py`` fetches the
vendored ones from npm at install time), so the browser fetches nothing from outside."""
