from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView


class MeApi(APIView):
    """Who the token belongs to: a cheap way for integrations to check their key."""

    class OutputSerializer(serializers.Serializer):
        id = serializers.IntegerField()
        username = serializers.CharField()
        email = serializers.EmailField()
        is_staff = serializers.BooleanField()

    serializer_class = OutputSerializer

    def get(self, request):
        return Response(self.OutputSerializer(request.user).data)
