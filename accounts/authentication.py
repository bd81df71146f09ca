from rest_framework import authentication


class TokenAuthentication(authentication.TokenAuthentication):
    """DRF's token authentication, also accepting `Authorization: Bearer <key>`.

    OpenAI's client libraries send the API key as a Bearer token; accepting both
    keywords lets them talk to /v1/ unchanged while curl users keep `Token <key>`.
    """

    keywords = ("Token", "Bearer")

    def authenticate(self, request):
        auth = authentication.get_authorization_header(request).split()
        if not auth or auth[0].decode(errors="replace").lower() not in {k.lower() for k in self.keywords}:
            return None
        if len(auth) == 1:
            raise authentication.exceptions.AuthenticationFailed("Invalid token header. No credentials provided.")
        if len(auth) > 2:
            raise authentication.exceptions.AuthenticationFailed("Invalid token header. Token string should not contain spaces.")
        try:
            token = auth[1].decode()
        except UnicodeError:
            raise authentication.exceptions.AuthenticationFailed("Invalid token header. Token string contains invalid characters.")
        return self.authenticate_credentials(token)

    def authenticate_header(self, request):
        return "Bearer"
