"""What every fedpriv role shares. Imports no role package, and changes nothing when imported."""
