"""What every layer shares: the project's errors (``errors``), the typed parameter groups
(``params``), the preprocessing record a model carries (``preprocessing``) and file-system paths
local or remote (``storage``)."""
