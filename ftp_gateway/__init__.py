"""FTP, FTPS and SFTP access for customers to their own CSV files."""
