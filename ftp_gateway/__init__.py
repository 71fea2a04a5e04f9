"""FTP, FTPS and SFTP access for customers to their own CSV files (not built yet: issue 5)."""
